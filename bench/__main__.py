"""``python -m bench``: run the benchmarks, merge the figures into latest.json, print them.

``--only cache executor batching`` runs some of them (the others' figures in the file
are kept as they are).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from types import ModuleType

from bench import batching_bench, cache_bench, executor_bench
from bench.results import DEFAULT_PATH, machine_facts, merge_write, print_table

#: The benchmarks, by name, in the order they run.
BENCHMARKS: dict[str, ModuleType] = {
    "cache": cache_bench,
    "executor": executor_bench,
    "batching": batching_bench,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="results file to merge into")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS), metavar="NAME"
    )
    args = parser.parse_args(argv)

    chosen = [BENCHMARKS[name] for name in BENCHMARKS if name in args.only]
    sections: dict[str, dict] = {}
    targets_met: dict[str, bool] = {}
    for bench in chosen:
        figures = asyncio.run(bench.run(quick=args.quick))
        targets_met.update(figures.pop("targets_met", {}))
        sections.update(figures)
    sections["targets_met"] = targets_met
    sections["machine"] = machine_facts()
    merged = merge_write(args.out, sections)
    print_table(sections, {name: t for b in chosen for name, t in b.TARGETS.items()})
    print(f"\nwrote {args.out}")
    failed = [name for name, ok in merged.get("targets_met", {}).items() if not ok]
    if failed:
        print(f"targets missed: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
