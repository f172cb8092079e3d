"""``python -m soak``: soak the stack as processes, print the figures, write them as JSON.

Exit code 0 when every check holds (no lost or stuck runs, no timeouts, no unexpected
outcomes, the store agrees with the clients, runs completed, every service still
SERVING, flat memory), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from soak.report import DEFAULT_PATH, print_summary, write_json
from soak.run import SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument(
        "--max-active-runs",
        type=int,
        default=defaults.max_active_runs,
        help="the executor's TRELLIS_MAX_ACTIVE_RUNS (0: the executor's default)",
    )
    parser.add_argument(
        "--line-delay-ms",
        type=float,
        default=defaults.model_line_delay_ms,
        help="time each plan line of the offline model takes",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep SQLite files and logs here"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="JSON results file")
    args = parser.parse_args(argv)

    config = SoakConfig(
        clients=args.clients,
        seconds=args.seconds,
        max_active_runs=args.max_active_runs or None,
        model_line_delay_ms=args.line_delay_ms,
        seed=args.seed,
        workdir=args.workdir,
    )
    summary = asyncio.run(run_soak(config))
    print_summary(summary)
    write_json(args.out, summary)
    print(f"\nwrote {args.out}")
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
