"""End to end over real gRPC: Run streams the right events, nodes overlap, GetRun agrees."""

import asyncio
import re

import pytest

from trellis.clients.costs import CostsClient
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, from_value, timestamp_seconds, to_struct
from trellis.runtime.errors import InvalidArgument, NotFound, ResourceExhausted
from trellis_cli.app import DEMO_GOAL

SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED


def node(node_id: str, tool: str, deps=(), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


async def collect(client: ExecutorClient, request: executor_pb2.RunRequest):
    return [event async for event in client.run(request)]


def by_kind(events, kind: str):
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


def interval(outcome: common_pb2.NodeOutcome) -> tuple[float, float]:
    return timestamp_seconds(outcome.started_at), timestamp_seconds(outcome.finished_at)


async def test_demo_goal_streams_events_in_order_and_get_run_agrees(executor) -> None:
    events = await collect(executor, executor_pb2.RunRequest(goal=DEMO_GOAL))
    kinds = [e.WhichOneof("event") for e in events]
    run_id = events[0].run_id
    assert all(e.run_id == run_id for e in events)
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert re.fullmatch(r"[0-9a-f]{32}", events[0].started.trace_id)

    planned = by_kind(events, "node_planned")
    commands = sorted(from_struct(p.call.args)["command"] for p in planned)
    assert commands == ["df -h", "uname -a", "uptime"]
    for p in planned:  # each node: planned, then started, then finished
        nid = p.call.node_id
        first = {
            k: next(
                i for i, e in enumerate(events) if e.WhichOneof("event") == k and _node_id(e) == nid
            )
            for k in ("node_planned", "node_started", "node_finished")
        }
        assert first["node_planned"] < first["node_started"] < first["node_finished"]

    finished = events[-1].finished
    assert finished.status == executor_pb2.RUN_STATUS_SUCCEEDED, finished.error
    answer = "".join(d.text for d in by_kind(events, "answer_delta"))
    assert answer and answer == finished.answer
    last_node_event = max(i for i, k in enumerate(kinds) if k == "node_finished")
    assert kinds.index("answer_delta") > last_node_event
    assert finished.usage.input_tokens > 0 and finished.usage.output_tokens > 0
    assert finished.cost_nano_usd > 0

    outcomes = {o.outcome.node_id: o.outcome for o in by_kind(events, "node_finished")}
    assert all(o.status == SUCCEEDED for o in outcomes.values())
    stored = await executor.get_run(run_id)
    assert stored.status == executor_pb2.RUN_STATUS_SUCCEEDED
    assert stored.answer == answer and stored.trace_id == events[0].started.trace_id
    assert {o.node_id: o for o in stored.outcomes} == outcomes
    assert [c.node_id for c in stored.plan] == [p.call.node_id for p in planned]


def _node_id(event: executor_pb2.RunResponse) -> str:
    kind = event.WhichOneof("event")
    if kind == "node_planned":
        return event.node_planned.call.node_id
    if kind == "node_started":
        return event.node_started.node_id
    if kind == "node_finished":
        return event.node_finished.outcome.node_id
    return ""


async def test_second_run_of_the_same_goal_hits_the_cache(executor) -> None:
    first = (await collect(executor, executor_pb2.RunRequest(goal=DEMO_GOAL)))[-1].finished
    second_events = await collect(executor, executor_pb2.RunRequest(goal=DEMO_GOAL))
    second = second_events[-1].finished
    assert first.cache_hits == 0
    hits = [o.outcome for o in by_kind(second_events, "node_finished") if o.outcome.cache_hit]
    assert second.cache_hits == len(hits) >= 2  # uname and df are cached for minutes


async def test_independent_nodes_overlap_and_dependent_waits_for_both(executor) -> None:
    plan = [
        node("a", "sleep", ms=300),
        node("b", "sleep", ms=300),
        node("c", "echo", ["a", "b"], value="${a.slept_ms}+${b.slept_ms}"),
    ]
    events = await collect(executor, executor_pb2.RunRequest(plan=plan))
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED
    outcomes = {f.outcome.node_id: f.outcome for f in by_kind(events, "node_finished")}
    (a0, a1), (b0, b1), (c0, _) = (interval(outcomes[n]) for n in "abc")
    assert a0 < b1 and b0 < a1, "independent nodes did not run at the same time"
    assert c0 >= max(a1, b1)
    assert from_value(outcomes["c"].output) == "300+300"
    assert events[-1].finished.answer == ""  # explicit plans skip the planner


async def test_invalid_explicit_plan_is_rejected_before_anything_runs(executor) -> None:
    plan = [node("a", "no_such_tool"), node("b", "echo", ["zz"], value=1)]
    with pytest.raises(InvalidArgument) as raised:
        await collect(executor, executor_pb2.RunRequest(plan=plan, run_id="bad-plan"))
    assert raised.value.reason == "INVALID_PLAN"
    assert {v.field for v in raised.value.violations} >= {"plan[0].tool"}
    with pytest.raises(NotFound):
        await executor.get_run("bad-plan")


async def test_gateway_contract_errors_become_failed_nodes_and_skip_dependents(executor) -> None:
    plan = [
        node("bad", "arithmetic", expression="2 +* 3"),
        node("after", "echo", ["bad"], value="$bad"),
        node("fine", "arithmetic", expression="6*7"),
    ]
    events = await collect(executor, executor_pb2.RunRequest(plan=plan))
    outcomes = {f.outcome.node_id: f.outcome for f in by_kind(events, "node_finished")}
    assert outcomes["bad"].status == common_pb2.NODE_STATUS_FAILED
    assert outcomes["bad"].error.code == "INVALID_EXPRESSION"
    assert outcomes["after"].status == common_pb2.NODE_STATUS_SKIPPED
    assert from_value(outcomes["fine"].output) == {"result": 42}


async def test_command_injection_through_a_run_starts_no_process(executor, tmp_path) -> None:
    sentinel = tmp_path / "sentinel"
    attempts = [f"uname; touch {sentinel}", f"$(touch {sentinel})", f"uname -a && touch {sentinel}"]
    plan = [node(f"n{i}", "run_command", command=c) for i, c in enumerate(attempts)]
    events = await collect(executor, executor_pb2.RunRequest(plan=plan))
    outcomes = [f.outcome for f in by_kind(events, "node_finished")]
    assert [o.status for o in outcomes] == [common_pb2.NODE_STATUS_FAILED] * 3
    assert {o.error.code for o in outcomes} == {"SHELL_SYNTAX_REJECTED"}
    assert not sentinel.exists()


async def test_cancel_run_cancels_in_flight_tool_calls(executor) -> None:
    run_id = "to-cancel"
    request = executor_pb2.RunRequest(run_id=run_id, plan=[node("long", "sleep", ms=10_000)])
    stream = executor.run(request)
    events = []
    async for event in stream:
        events.append(event)
        if event.WhichOneof("event") == "node_started":
            reply = await executor.cancel_run(run_id)
            assert reply.status == executor_pb2.RUN_STATUS_CANCELLED
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_CANCELLED
    assert by_kind(events, "node_finished")[0].outcome.status == common_pb2.NODE_STATUS_CANCELLED
    stored = await executor.get_run(run_id)
    assert stored.status == executor_pb2.RUN_STATUS_CANCELLED
    assert stored.outcomes[0].status == common_pb2.NODE_STATUS_CANCELLED


async def test_runs_are_private_to_their_tenant(executor) -> None:
    with context.request_scope(tenant_id="acme"):
        events = await collect(executor, executor_pb2.RunRequest(plan=[node("a", "echo", value=1)]))
        assert (await executor.get_run(events[0].run_id)).tenant_id == "acme"
    with context.request_scope(tenant_id="other"), pytest.raises(NotFound) as raised:
        await executor.get_run(events[0].run_id)
    assert raised.value.reason == "RUN_NOT_FOUND"


async def test_run_over_budget_is_refused(stack, executor, channels) -> None:
    costs = CostsClient(channels.get(stack.target("costs")))
    with context.request_scope(tenant_id="thrifty"):
        await collect(executor, executor_pb2.RunRequest(goal=DEMO_GOAL))
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(tenant_id="thrifty", daily_limit_nano_usd=1)
        )
        with pytest.raises(ResourceExhausted) as raised:
            await collect(executor, executor_pb2.RunRequest(goal=DEMO_GOAL))
    assert raised.value.reason == "BUDGET_EXCEEDED"


async def test_run_deadline_fails_the_run_with_deadline_exceeded(executor) -> None:
    options = executor_pb2.RunOptions()
    options.timeout.FromMilliseconds(300)
    request = executor_pb2.RunRequest(plan=[node("slow", "sleep", ms=5000)], options=options)
    events = await asyncio.wait_for(collect(executor, request), timeout=10)
    finished = events[-1].finished
    assert finished.status == executor_pb2.RUN_STATUS_FAILED
    assert finished.error.code == "DEADLINE_EXCEEDED"


async def test_client_that_goes_away_cancels_the_run(executor) -> None:
    run_id = "client-leaves"
    request = executor_pb2.RunRequest(run_id=run_id, plan=[node("long", "sleep", ms=10_000)])
    stream = executor.run(request)
    async for event in stream:
        if event.WhichOneof("event") == "node_started":
            break
    await stream.aclose()  # cancels the RPC, as a client process dying would
    for _ in range(100):
        stored = await executor.get_run(run_id)
        if stored.status != executor_pb2.RUN_STATUS_RUNNING:
            break
        await asyncio.sleep(0.05)
    assert stored.status == executor_pb2.RUN_STATUS_CANCELLED
    assert stored.outcomes[0].status == common_pb2.NODE_STATUS_CANCELLED
