"""The soak's summary as rich tables and as a JSON file."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

DEFAULT_PATH = Path(__file__).parent / "results" / "latest.json"


def machine_facts() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_json(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` (with the machine's facts) to ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**summary, "machine": machine_facts()}, indent=2) + "\n")
    tmp.replace(path)


def _ms(figures: dict[str, Any]) -> str:
    if not figures.get("n"):
        return "-"
    return f"{figures['p50']:.0f} / {figures['p99']:.0f}"


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    config, runs = summary["config"], summary["runs"]
    console.rule(
        f"soak: {config['clients']} clients x {config['seconds']:g} s, "
        f"max_active_runs {config['max_active_runs']}, seed {config['seed']}"
    )
    figures = Table(title="runs", show_header=True)
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    rows = [
        ("runs attempted", runs["attempted"]),
        ("runs completed (finished event)", runs["completed"]),
        ("  of which succeeded", runs["succeeded"]),
        ("throughput (completed/s)", runs["throughput_completed_per_s"]),
        ("latency p50 / p99 ms (succeeded)", _ms(summary["latency_ms"])),
        ("shed (RESOURCE_EXHAUSTED RUN_CAPACITY)", runs["shed"]),
        ("shed answer p50 / p99 ms", _ms(summary["shed_latency_ms"])),
        ("timeouts", runs["timeouts"]),
        ("unexpected outcomes", runs["unexpected"]),
        ("lost runs", runs["lost"]),
        ("stuck runs", runs["stuck"]),
        ("store disagrees with client", runs["store_mismatches"]),
        ("peak runs executing at once (store)", runs["peak_active_runs"]),
    ]
    for name, value in rows:
        figures.add_row(name, str(value))
    console.print(figures)

    ended = Table(title="how calls ended")
    ended.add_column("status / code")
    ended.add_column("count", justify="right")
    for name, count in summary["ended_by"].items():
        ended.add_row(name, str(count))
    for name, count in summary["errors_by_reason"].items():
        ended.add_row(f"  {name}", str(count))
    for name, count in summary["node_errors"].items():
        ended.add_row(f"  node {name}", str(count))
    console.print(ended)

    kinds = Table(title="by kind")
    for column in ("kind", "runs", "expected", "shed", "timeout", "unexpected", "p50 / p99 ms"):
        kinds.add_column(column, justify="left" if column == "kind" else "right")
    for kind, row in summary["kinds"].items():
        kinds.add_row(
            kind,
            *(str(row[k]) for k in ("runs", "expected", "shed", "timeout", "unexpected")),
            _ms(row["latency_ms"]),
        )
    console.print(kinds)

    memory = Table(title="RSS per process (MB); trend = slope over the second half")
    for column in ("process", "start", "peak", "end", "trend MB/min", "verdict"):
        memory.add_column(column, justify="left" if column == "process" else "right")
    for name, row in summary["rss"].items():
        memory.add_row(
            name,
            f"{row['start_mb']:.1f}",
            f"{row['peak_mb']:.1f}",
            f"{row['end_mb']:.1f}",
            f"{row['trend_mb_per_min']:+.2f}",
            row["verdict"],
        )
    console.print(memory)

    checks = Table(title="checks")
    checks.add_column("check")
    checks.add_column("result")
    for name, ok in summary["checks"].items():
        checks.add_row(name, "[green]ok[/green]" if ok else "[red]FAILED[/red]")
    console.print(checks)
    for example in summary["unexpected_examples"]:
        console.print(f"unexpected: {example}")
