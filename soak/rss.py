"""Memory of the stack's processes over time: VmRSS sampled every second, and its trend.

A leak shows as RSS that keeps growing once the process has warmed up, so the trend is
the least-squares slope of RSS over the *second half* of the samples (the first half
holds start-up and warm-up: imports, pools, caches filling), in MB per minute. The
verdict is ``flat`` when that slope stays under ``GROWTH_LIMIT_MB_PER_MIN``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: A trend at or above this (MB/min, second half) is reported as ``growing``.
GROWTH_LIMIT_MB_PER_MIN = 2.0


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, mb)`` points, in MB per minute (0 if < 2)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


@dataclass
class RssSampler:
    """Samples every ``pids`` process each ``interval`` seconds until stopped."""

    pids: Mapping[str, int]
    interval: float = 1.0
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _t0: float = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self.sample()
        self._task = asyncio.create_task(self._loop(), name="rss-sampler")

    def sample(self) -> None:
        now = time.monotonic() - self._t0
        for name, pid in self.pids.items():
            mb = rss_mb(pid)
            if mb is not None:
                self.samples.setdefault(name, []).append((round(now, 2), round(mb, 2)))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()

    async def stop(self) -> None:
        """Stop sampling (no last sample: the load has ended, it would not be comparable)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per process: start, peak and end MB, the second-half trend and its verdict."""
        out: dict[str, dict[str, Any]] = {}
        for name, points in self.samples.items():
            half = points[len(points) // 2 :]
            slope = slope_per_minute(half)
            out[name] = {
                "start_mb": points[0][1],
                "peak_mb": max(v for _, v in points),
                "end_mb": points[-1][1],
                "samples": len(points),
                "trend_mb_per_min": round(slope, 3),
                "verdict": "flat" if slope < GROWTH_LIMIT_MB_PER_MIN else "growing",
                "series": points,
            }
        return out
