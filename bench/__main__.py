"""``python -m bench``: run the benchmarks, merge the figures into latest.json, print them.

``--only NAME`` (repeatable) runs some of them - a benchmark (cache, executor, batching,
processes) or one section of the executor's (skewed_dag, streamed_plan, ...); the other figures in
the file are kept as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from types import ModuleType

from bench import batching_bench, cache_bench, executor_bench, process_bench
from bench.results import DEFAULT_PATH, machine_facts, merge_write, print_table, targets_met

#: The benchmarks, by name, in the order they run.
BENCHMARKS: dict[str, ModuleType] = {
    "cache": cache_bench,
    "executor": executor_bench,
    "batching": batching_bench,
    "processes": process_bench,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="results file to merge into")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
    parser.add_argument(
        "--only",
        action="append",
        choices=[*BENCHMARKS, *executor_bench.SECTIONS],
        help="run only this benchmark (repeatable); the other figures in the file stay",
    )
    args = parser.parse_args(argv)
    only = set(args.only or ())

    sections: dict[str, dict] = {}
    targets: dict[str, tuple[str, float]] = {}
    for name, bench in BENCHMARKS.items():
        parts = only & set(getattr(bench, "SECTIONS", ()))
        if only and name not in only and not parts:
            continue
        options = {"only": parts} if parts and name not in only else {}
        sections.update(asyncio.run(bench.run(quick=args.quick, **options)))
        targets.update(bench.TARGETS)
    verdicts = targets_met(sections, targets)
    sections["targets_met"] = verdicts
    if only:  # the file's other figures come from another run: say when these were taken
        for name in list(sections):
            if name != "targets_met" and isinstance(sections[name], dict):
                sections[name]["machine"] = machine_facts()
    else:
        sections["machine"] = machine_facts()
    merged = merge_write(args.out, sections)
    print_table(sections, targets)
    print(f"\nwrote {args.out}")
    failed = [name for name, ok in merged.get("targets_met", {}).items() if not ok]
    if failed:
        print(f"targets missed: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
