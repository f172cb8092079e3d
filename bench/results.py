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
        # other work on the host shows in every figure: 1-minute load average when run
        "load_average_1m": round(os.getloadavg()[0], 2),
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


def figure(sections: Mapping[str, Any], name: str) -> Any:
    """The value at the dotted ``name`` (``streamed_plan.jsonl.emit_to_start_p50_ms``)."""
    value: Any = sections
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def meets(value: float, op: str, bound: float) -> bool:
    """Whether ``value`` meets the target ``op bound`` (``<=``, ``>=`` or ``==``)."""
    if op == "<=":
        return value <= bound
    if op == ">=":
        return value >= bound
    return value == bound


def targets_met(
    sections: Mapping[str, Any], targets: Mapping[str, tuple[str, float]]
) -> dict[str, bool]:
    """Each target's verdict (dotted figure name -> met), for the targets whose section
    was measured; a figure that is missing or not a number is not met."""
    verdicts = {}
    for name, (op, bound) in targets.items():
        if name.split(".")[0] not in sections:
            continue
        value = figure(sections, name)
        verdicts[name] = isinstance(value, int | float) and meets(value, op, bound)
    return verdicts


def _flat(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every figure, nested sections (per format) included."""
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.extend(_flat(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def print_table(
    sections: Mapping[str, Mapping[str, Any]], targets: Mapping[str, tuple[str, float]]
) -> None:
    """One line per figure; targets shown as ``<= x`` / ``>= x`` / ``== x`` with ok/MISSED."""
    rows = []
    for section, values in sections.items():
        if section in ("machine", "targets_met"):
            continue
        for key, value in _flat(values):
            name = f"{section}.{key}"
            target, verdict = "", ""
            if name in targets:
                op, bound = targets[name]
                target = f"{op} {bound:g}"
                ok = meets(value, op, bound)
                verdict = "ok" if ok else "MISSED"
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            rows.append((name, shown, target, verdict))
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>10}  {'target':>8}")
    for name, shown, target, verdict in rows:
        print(f"{name:<{width}}  {shown:>10}  {target:>8}  {verdict}")
    machine = sections.get("machine") or next(
        (v["machine"] for v in sections.values() if isinstance(v, Mapping) and "machine" in v), {}
    )
    if machine:
        print(
            f"\n{machine.get('cpu_count')} CPUs, Python {machine.get('python')}, "
            f"grpcio {machine.get('grpcio')}, {machine.get('date')}"
        )
