"""``python -m bench``: run every benchmark, merge the figures into latest.json, print them."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bench import batching_bench, cache_bench, executor_bench
from bench.results import DEFAULT_PATH, machine_facts, merge_write, print_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="results file to merge into")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
    args = parser.parse_args(argv)

    sections = asyncio.run(cache_bench.run(quick=args.quick))
    executor = asyncio.run(executor_bench.run(quick=args.quick))
    batching = asyncio.run(batching_bench.run(quick=args.quick))
    targets_met = {
        **sections.pop("targets_met", {}),
        **executor.pop("targets_met", {}),
        **batching.pop("targets_met", {}),
    }
    sections.update(executor)
    sections.update(batching)
    sections["targets_met"] = targets_met
    sections["machine"] = machine_facts()
    merged = merge_write(args.out, sections)
    print_table(
        sections, {**cache_bench.TARGETS, **executor_bench.TARGETS, **batching_bench.TARGETS}
    )
    print(f"\nwrote {args.out}")
    failed = [name for name, ok in merged.get("targets_met", {}).items() if not ok]
    if failed:
        print(f"targets missed: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
