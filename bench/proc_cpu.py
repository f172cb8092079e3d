"""CPU time of processes from ``/proc/<pid>/stat``: user + system, in milliseconds.

The process benchmarks divide what the five service processes spent over a phase by the
nodes that phase ran, so the figure is the whole stack's CPU per node, whichever
process spends it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """utime + stime of ``pid`` so far, in ms (its own threads, not its children)."""
    with open(f"/proc/{pid}/stat") as stat:
        # the command name (field 2) is in parentheses and may hold spaces: split after it
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) * 1000 / _TICKS_PER_SECOND


def snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    """Each named process's CPU ms so far."""
    return {name: cpu_ms(pid) for name, pid in pids.items()}


def spent(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU ms each process spent between two snapshots."""
    return {name: after[name] - before[name] for name in before}
