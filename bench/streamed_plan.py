"""``streamed_plan``: the model writes one node every 200 ms; how soon does it start?

Measured for each plan format (``streamed_plan.<format>.*``): ``jsonl`` (a line of JSON
Lines), ``json_schema`` (a node object of the ``{"nodes": [...]}`` document) and
``tool_calls`` (a streamed tool call). The embedded stack's planner gets each format
from the run's model name (``FORMAT_MODELS``, given to it as TRELLIS_MODEL_PLAN_FORMATS).

The offline model paces plans per node: with ``state.line_delay_ms`` each node (the
line, the object, the call's id/name delta and its argument fragments) takes that long
to stream, token by token, and ``state.on_plan_node`` is called with its index once its
last piece has been written to the SSE stream: the moment the line ends, the object's
brace closes, the call's arguments close. The benchmark scripts the plan (the nodes, in
whatever format the request asks), sets both for its runs, and takes a node's emit time
in that hook. The k-th node emitted is the k-th ``node_planned`` of the run. Client and
servers share one process, so ``time.perf_counter`` is one clock for both:

- ``emit_to_start_*``: model emitted the node → ``node_started`` event at the client
  (planner parse + validation, Plan stream hop, executor admit + store writes, Run hop).
- ``emit_to_executor_p50_ms``: same emit → the node reaching the executor's scheduler
  (model SSE → openai client → planner parse/validate → Plan stream hop); the rest of
  ``emit_to_start`` is the executor (store write of ``node_planned``, dispatch) + Run hop.
  The arrival is timed by wrapping ``DagScheduler._admit`` (no event carries that moment).
- ``emit_to_tool_start_*``: same emit → the tool's ``NodeOutcome.started_at`` in the gateway
  (wall clock on both sides).

The plan is the skewed DAG (``jsonl``, ``json_schema``); a tool-call plan cannot say
dependencies, so ``tool_calls`` streams the same six calls without them (the slow sleep,
four 50 ms sleeps, an echo). Every node's dependencies have finished before it is
emitted (emits at 200..1200 ms), so the figures are pure scheduling overhead.
``wait_for_plan_ms`` is what an executor that waits for the whole plan would take: plan
fully streamed (measured, since the request) + the DAG's critical path (300 ms either
way) + the answer tail measured in the same run (last node finished → ``finished``).
"""

from __future__ import annotations

import time
from typing import Any

from bench.dag_common import (
    CHAIN_LEN,
    CHAIN_MS,
    SKEWED_CRITICAL_MS,
    SLOW_MS,
    median,
    percentile_ms,
    r,
    skewed_nodes,
    timed_run,
)
from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis_cli.stack import Stack
from trellis_executor.scheduler import DagScheduler
from trellis_offline_model.behaviour import Behaviour

LINE_INTERVAL_MS = 200
#: The model name that gives each format (the planner's TRELLIS_MODEL_PLAN_FORMATS).
FORMAT_MODELS = {
    "jsonl": "bench-jsonl",
    "json_schema": "bench-json-schema",
    "tool_calls": "bench-tool-calls",
}


def independent_nodes() -> list[dict[str, Any]]:
    """The skewed DAG's six calls without dependencies (a tool-call plan has none)."""
    nodes: list[dict[str, Any]] = [
        {"node_id": "slow", "tool": "sleep", "args": {"ms": SLOW_MS}, "depends_on": []}
    ]
    nodes += [
        {"node_id": f"c{i}", "tool": "sleep", "args": {"ms": CHAIN_MS}, "depends_on": []}
        for i in range(1, CHAIN_LEN + 1)
    ]
    nodes.append({"node_id": "join", "tool": "echo", "args": {"value": "done"}, "depends_on": []})
    return nodes


class PacedPlan:
    """Serves one scripted plan a node at a time and records when each node went out."""

    def __init__(self, stack: Stack, nodes: list[dict[str, Any]]) -> None:
        assert stack.model is not None
        self.state = stack.model.state
        self.nodes = nodes
        self.emitted_perf: dict[int, float] = {}
        self.emitted_wall: dict[int, float] = {}
        self.admitted: dict[str, float] = {}
        self._original_admit = DagScheduler._admit

    def __enter__(self) -> PacedPlan:
        self.state.line_delay_ms = LINE_INTERVAL_MS
        self.state.on_plan_node = self._emitted
        original_admit, admitted = self._original_admit, self.admitted

        async def admit(scheduler: DagScheduler, call: Any) -> None:
            admitted.setdefault(call.node_id, time.perf_counter())  # node reached the executor
            await original_admit(scheduler, call)

        DagScheduler._admit = admit  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        DagScheduler._admit = self._original_admit  # type: ignore[method-assign]
        self.state.line_delay_ms = 0
        self.state.on_plan_node = None
        self.state.next_behaviour = lambda body: None

    def arm(self) -> None:
        self.emitted_perf.clear()
        self.emitted_wall.clear()
        self.admitted.clear()
        once = [Behaviour(plan=tuple(self.nodes))]  # the next request (the plan): then rules
        self.state.next_behaviour = lambda body: once.pop() if once else None

    def _emitted(self, index: int, text: str) -> None:
        """The model server's hook: node ``index`` has just been written to the stream."""
        self.emitted_perf.setdefault(index, time.perf_counter())
        self.emitted_wall.setdefault(index, time.time())


async def measure_format(
    stack: Stack, client: ExecutorClient, samples: int, fmt: str
) -> dict[str, Any]:
    nodes = independent_nodes() if fmt == "tool_calls" else skewed_nodes()
    emit_to_start: list[float] = []
    emit_to_tool: list[float] = []
    emit_to_admit: list[float] = []
    streamed, waited, plan_done, tails = [], [], [], []
    options = executor_pb2.RunOptions(model=FORMAT_MODELS[fmt])
    with PacedPlan(stack, nodes) as paced:
        for _ in range(samples):
            paced.arm()
            run = await timed_run(
                client,
                executor_pb2.RunRequest(goal="benchmark: a paced, streamed plan", options=options),
            )
            planned = [e.node_planned.call for _, e in run.events if e.HasField("node_planned")]
            started = run.arrivals("node_started")
            finished_at = run.arrivals("node_finished")
            outcomes = run.outcomes()
            assert len(planned) == len(nodes) == len(paced.emitted_perf), (
                planned,
                paced.emitted_perf,
            )
            for index, call in enumerate(planned):
                emitted = paced.emitted_perf[index]
                if any(finished_at[d] > emitted for d in call.depends_on):
                    continue  # waited for a dependency, not for the scheduler
                emit_to_start.append((started[call.node_id] - emitted) * 1000)
                emit_to_admit.append((paced.admitted[call.node_id] - emitted) * 1000)
                tool_start = outcomes[call.node_id].started_at
                tool_wall = tool_start.seconds + tool_start.nanos / 1e9
                emit_to_tool.append((tool_wall - paced.emitted_wall[index]) * 1000)
            done_ms = (max(paced.emitted_perf.values()) - run.t0_perf) * 1000
            tail_ms = (run.events[-1][0] - max(finished_at.values())) * 1000
            streamed.append(run.wall_ms)
            plan_done.append(done_ms)
            tails.append(tail_ms)
            waited.append(done_ms + SKEWED_CRITICAL_MS + tail_ms)
    return {
        "line_interval_ms": LINE_INTERVAL_MS,
        "nodes": len(nodes),
        "runs": samples,
        "emit_to_start_p50_ms": r(percentile_ms(emit_to_start, 50), 3),
        "emit_to_start_p99_ms": r(percentile_ms(emit_to_start, 99), 3),
        "emit_to_executor_p50_ms": r(percentile_ms(emit_to_admit, 50), 3),
        "emit_to_tool_start_p50_ms": r(percentile_ms(emit_to_tool, 50), 3),
        "emit_to_tool_start_p99_ms": r(percentile_ms(emit_to_tool, 99), 3),
        "plan_streamed_ms": r(median(plan_done)),
        "answer_tail_ms": r(median(tails)),
        "streamed_ms": r(median(streamed)),
        "wait_for_plan_ms": r(median(waited)),
        "streamed_over_wait_for_plan": r(median(streamed) / median(waited), 3),
    }


async def measure(stack: Stack, client: ExecutorClient, samples: int) -> dict[str, Any]:
    """``{format: figures}`` for the three plan formats."""
    return {fmt: await measure_format(stack, client, samples, fmt) for fmt in FORMAT_MODELS}
