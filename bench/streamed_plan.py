"""``streamed_plan``: the model writes one plan line every 200 ms; how soon does it start?

The offline model paces plans per line: with ``state.line_delay_ms`` each line of a plan
(the answer to a planning prompt; the join's answer is not paced) takes that long to
stream, token by token, and ``state.on_plan_line`` is called with each plan line once its
last piece has been written to the SSE stream. The benchmark scripts the plan (the skewed
DAG as JSONL), sets both for the duration of its runs, and takes a line's emit time in
that hook. Client and servers share one process, so ``time.perf_counter`` is one clock
for both:

- ``emit_to_start_*``: model emitted the node's line → ``node_started`` event at the client
  (planner parse + validation, Plan stream hop, executor admit + store writes, Run hop).
- ``emit_to_executor_p50_ms``: same emit → the node reaching the executor's scheduler
  (model SSE → openai client → planner parse/validate → Plan stream hop); the rest of
  ``emit_to_start`` is the executor (store write of ``node_planned``, dispatch) + Run hop.
  The arrival is timed by wrapping ``DagScheduler._admit`` (no event carries that moment).
- ``emit_to_tool_start_*``: same emit → the tool's ``NodeOutcome.started_at`` in the gateway
  (wall clock on both sides).

Every node's dependencies have finished before its line is emitted (the plan is the skewed
DAG; emits at 200..1200 ms), so both figures are pure scheduling overhead.
``wait_for_plan_ms`` is what an executor that waits for the whole plan would take:
plan fully streamed (measured, since the request) + the DAG's critical path + the answer
tail measured in the same run (last node finished → ``finished`` at the client).
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.dag_common import SKEWED_CRITICAL_MS, median, percentile_ms, r, skewed_nodes, timed_run
from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis_cli.stack import Stack
from trellis_executor.scheduler import DagScheduler
from trellis_offline_model.behaviour import Behaviour

LINE_INTERVAL_MS = 200


class PacedPlan:
    """Serves one scripted plan a line at a time and records when each line went out."""

    def __init__(self, stack: Stack, nodes: list[dict[str, Any]]) -> None:
        assert stack.model is not None
        self.state = stack.model.state
        self.nodes = nodes
        self.text = "".join(json.dumps(n) + "\n" for n in nodes)
        self.emitted_perf: dict[str, float] = {}
        self.emitted_wall: dict[str, float] = {}
        self.admitted: dict[str, float] = {}
        self._original_admit = DagScheduler._admit

    def __enter__(self) -> PacedPlan:
        self.state.line_delay_ms = LINE_INTERVAL_MS
        self.state.on_plan_line = self._emitted
        original_admit, admitted = self._original_admit, self.admitted

        async def admit(scheduler: DagScheduler, call: Any) -> None:
            admitted.setdefault(call.node_id, time.perf_counter())  # node reached the executor
            await original_admit(scheduler, call)

        DagScheduler._admit = admit  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        DagScheduler._admit = self._original_admit  # type: ignore[method-assign]
        self.state.line_delay_ms = 0
        self.state.on_plan_line = None

    def arm(self) -> None:
        self.emitted_perf.clear()
        self.emitted_wall.clear()
        self.admitted.clear()
        once = [Behaviour(text=self.text)]  # the next request (the plan): then the rules
        self.state.next_behaviour = lambda: once.pop() if once else None

    def _emitted(self, line: str) -> None:
        """The model server's hook: ``line`` has just been written to the stream."""
        if not line.strip():
            return
        node_id = json.loads(line)["node_id"]
        self.emitted_perf[node_id] = time.perf_counter()
        self.emitted_wall[node_id] = time.time()


async def measure(stack: Stack, client: ExecutorClient, samples: int) -> dict[str, Any]:
    nodes = skewed_nodes()
    emit_to_start: list[float] = []
    emit_to_tool: list[float] = []
    emit_to_admit: list[float] = []
    streamed, waited, plan_done, tails = [], [], [], []
    with PacedPlan(stack, nodes) as paced:
        for _ in range(samples):
            paced.arm()
            run = await timed_run(
                client, executor_pb2.RunRequest(goal="benchmark: a paced, streamed plan")
            )
            started = run.arrivals("node_started")
            finished_at = run.arrivals("node_finished")
            outcomes = run.outcomes()
            assert set(started) == set(paced.emitted_perf), (started, paced.emitted_perf)
            for nid, emitted in paced.emitted_perf.items():
                deps = next(n["depends_on"] for n in nodes if n["node_id"] == nid)
                if any(finished_at[d] > emitted for d in deps):
                    continue  # waited for a dependency, not for the scheduler
                emit_to_start.append((started[nid] - emitted) * 1000)
                emit_to_admit.append((paced.admitted[nid] - emitted) * 1000)
                tool_start = outcomes[nid].started_at
                tool_wall = tool_start.seconds + tool_start.nanos / 1e9
                emit_to_tool.append((tool_wall - paced.emitted_wall[nid]) * 1000)
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
