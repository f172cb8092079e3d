"""Writing ``latest.json`` and describing the machine the figures came from.

Benchmarks each own a few top-level sections (``cache``, ``single_flight``, ...). The
file is read, the sections of this run are updated key by key, and written back
atomically, so a benchmark added later never erases another's figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

DEFAULT_PATH = Path(__file__).parent / "results" / "latest.json"


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


def machine_facts() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def merge_write(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Update ``path`` with ``sections`` (key by key within each section); return the result."""
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}  # a broken file is replaced rather than stopping the benchmark
    for name, values in sections.items():
        current = data.get(name)
        data[name] = {**current, **values} if isinstance(current, dict) else dict(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return data


def targets_met(
    sections: Mapping[str, Mapping[str, Any]], targets: Mapping[str, tuple[str, float]]
) -> dict[str, bool]:
    """Whether each figure of ``targets`` (``section.key``: (``<=`` or ``==``, bound)) is met;
    a figure that was not measured is not."""
    met = {}
    for name, (op, bound) in targets.items():
        section, key = name.split(".", 1)
        value = sections.get(section, {}).get(key)
        met[name] = value is not None and bool(value <= bound if op == "<=" else value == bound)
    return met


def print_table(
    sections: Mapping[str, Mapping[str, Any]], targets: Mapping[str, tuple[str, float]]
) -> None:
    """One line per figure; targets shown as ``<= x`` / ``== x`` with ok/MISSED."""
    rows = []
    for section, values in sections.items():
        if section in ("machine", "targets_met"):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            target, verdict = "", ""
            if name in targets:
                op, bound = targets[name]
                target = f"{op} {bound:g}"
                ok = value <= bound if op == "<=" else value == bound
                verdict = "ok" if ok else "MISSED"
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            rows.append((name, shown, target, verdict))
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>10}  {'target':>8}")
    for name, shown, target, verdict in rows:
        print(f"{name:<{width}}  {shown:>10}  {target:>8}  {verdict}")
    machine = sections.get("machine", {})
    if machine:
        print(
            f"\n{machine.get('cpu_count')} CPUs, Python {machine.get('python')}, "
            f"grpcio {machine.get('grpcio')}, {machine.get('date')}"
        )
