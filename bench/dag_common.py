"""Shared pieces of the executor benchmarks: the skewed DAG, plan building, timed runs."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.results import percentile
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import timestamp_seconds, to_struct

#: The skewed DAG: one slow node beside a chain of fast ones, joined by an echo.
SLOW_MS = 300
CHAIN_MS = 50
CHAIN_LEN = 4
SKEWED_CRITICAL_MS = max(SLOW_MS, CHAIN_LEN * CHAIN_MS)  # + the join's own ~0 ms
SKEWED_SEQUENTIAL_IDEAL_MS = SLOW_MS + CHAIN_LEN * CHAIN_MS


def call(node_id: str, tool: str, deps: Sequence[str] = (), **args: object) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        node_id=node_id, tool=tool, args=to_struct(dict(args)), depends_on=list(deps)
    )


def skewed_nodes() -> list[dict[str, object]]:
    """The skewed DAG as plain dicts (node_id, tool, args, depends_on): JSONL-ready."""
    nodes: list[dict[str, object]] = [
        {"node_id": "slow", "tool": "sleep", "args": {"ms": SLOW_MS}, "depends_on": []}
    ]
    prev: list[str] = []
    for i in range(1, CHAIN_LEN + 1):
        nodes.append(
            {"node_id": f"c{i}", "tool": "sleep", "args": {"ms": CHAIN_MS}, "depends_on": prev}
        )
        prev = [f"c{i}"]
    last = f"c{CHAIN_LEN}"
    nodes.append(
        {
            "node_id": "join",
            "tool": "echo",
            "args": {"value": f"${{slow.slept_ms}}+${{{last}.slept_ms}}"},
            "depends_on": ["slow", last],
        }
    )
    return nodes


def skewed_plan() -> list[common_pb2.ToolCall]:
    return [
        call(str(n["node_id"]), str(n["tool"]), list(n["depends_on"]), **n["args"])  # type: ignore[arg-type]
        for n in skewed_nodes()
    ]


@dataclass
class TimedRun:
    """One run as the client saw it: wall time, per-event arrival times, outcomes."""

    wall_ms: float
    t0_perf: float
    t0_wall: float
    events: list[tuple[float, executor_pb2.RunResponse]] = field(default_factory=list)

    @property
    def finished(self) -> executor_pb2.RunFinished:
        return self.events[-1][1].finished

    def outcomes(self) -> dict[str, common_pb2.NodeOutcome]:
        return {
            e.node_finished.outcome.node_id: e.node_finished.outcome
            for _, e in self.events
            if e.WhichOneof("event") == "node_finished"
        }

    def arrivals(self, kind: str) -> dict[str, float]:
        """node_id -> perf_counter time its first ``kind`` event reached the client."""
        out: dict[str, float] = {}
        for at, e in self.events:
            if e.WhichOneof("event") != kind:
                continue
            if kind == "node_started":
                node_id = e.node_started.node_id
            elif kind == "node_planned":
                node_id = e.node_planned.call.node_id
            else:
                node_id = e.node_finished.outcome.node_id
            out.setdefault(node_id, at)
        return out

    def intervals_ms(self) -> dict[str, tuple[float, float]]:
        """node_id -> (start, end) in ms since the request, from NodeOutcome timestamps."""
        return {
            nid: (
                (timestamp_seconds(o.started_at) - self.t0_wall) * 1000,
                (timestamp_seconds(o.finished_at) - self.t0_wall) * 1000,
            )
            for nid, o in self.outcomes().items()
        }


async def timed_run(client: ExecutorClient, request: executor_pb2.RunRequest) -> TimedRun:
    """Run ``request`` and time it from the request to the ``finished`` event at the client."""
    if not request.run_id:
        request.run_id = uuid.uuid4().hex
    t0_wall, t0 = time.time(), time.perf_counter()
    run = TimedRun(0.0, t0, t0_wall)
    async for event in client.run(request):
        run.events.append((time.perf_counter(), event))
    run.wall_ms = (run.events[-1][0] - t0) * 1000
    finished = run.finished
    if finished.status != executor_pb2.RUN_STATUS_SUCCEEDED:
        raise RuntimeError(f"bench run failed: {finished.error.code} {finished.error.message}")
    return run


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def percentile_ms(samples: Sequence[float], p: float) -> float:
    return float(percentile(samples, p)) if samples else float("nan")


def r(value: float, digits: int = 2) -> float:
    return round(value, digits)
