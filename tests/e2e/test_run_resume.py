"""Durable runs: resume after a crash or a restart, hand-over on stop, lost leases,
ResumeRun following a run from any replica (embedded stack, SQLite run store)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.model_script import script_of
from trellis.clients.costs import CostsClient
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import from_value, to_struct, to_value
from trellis.runtime.errors import InvalidArgument, NotFound, Unavailable
from trellis.runtime.server import RunningServer
from trellis_cli.stack import Stack, start_stack
from trellis_costs.ledger import UsageEvent, UsageKind, open_ledger
from trellis_costs.prices import PriceTable
from trellis_executor.service import build as build_executor
from trellis_executor.settings import ExecutorSettings
from trellis_executor.store import Progress, open_store

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
RUNNING = executor_pb2.RUN_STATUS_RUNNING
DONE = common_pb2.NODE_STATUS_SUCCEEDED
MODEL = "trellis-offline-rules-v1"


def node(node_id: str, tool: str, deps: tuple[str, ...] = (), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def kinds(events: list[executor_pb2.RunResponse]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def outcomes(events: list[executor_pb2.RunResponse]) -> dict[str, common_pb2.NodeOutcome]:
    return {
        e.node_finished.outcome.node_id: e.node_finished.outcome
        for e in events
        if e.HasField("node_finished")
    }


async def collect(
    stream: AsyncIterator[executor_pb2.RunResponse],
) -> list[executor_pb2.RunResponse]:
    return [event async for event in stream]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/runs.db"


async def crashed_run(
    db_url: str,
    request: executor_pb2.RunRequest,
    plan: list[common_pb2.ToolCall],
    done: dict[str, object],
    progress: Progress | None = None,
) -> None:
    """The store as a replica that died mid-run left it: its lease already expired."""
    dead = await open_store(db_url, owner="dead-replica", lease_seconds=0.5)
    try:
        await dead.create(request.run_id, "default", request, "ab" * 16, "cd" * 8)
        for seq, call in enumerate(plan, 1):
            await dead.add_nodes(request.run_id, seq, [call])
        for node_id, output in done.items():
            outcome = common_pb2.NodeOutcome(node_id=node_id, status=DONE, attempts=1)
            outcome.output.CopyFrom(to_value(output))
            await dead.set_outcome(request.run_id, outcome)
        if progress is not None:
            await dead.save_progress(request.run_id, progress)
    finally:
        await dead.close()
    await asyncio.sleep(0.6)


async def second_executor(serve, stack: Stack, db_url: str, instance: str, **kw) -> ExecutorClient:
    settings = ExecutorSettings(
        host="127.0.0.1", port=0, metrics_port=0, database_url=db_url, instance_id=instance,
        planner_target=stack.target("planner"), toolgateway_target=stack.target("toolgateway"),
        costs_target=stack.target("costs"), auth=False, **kw,
    )  # fmt: skip
    server: RunningServer = await serve("executor", build_executor, settings)
    return ExecutorClient(server.channels.get(server.target))


@pytest.fixture
async def stack_on(db_url: str) -> AsyncIterator[Stack]:
    running = await start_stack(database_url=db_url, instance_id="exec-a", lease_seconds=0.6)
    yield running
    await running.stop()


async def test_resumed_explicit_plan_reruns_only_unfinished_nodes(db_url, channels) -> None:
    plan = [
        node("a", "echo", value="fresh"),
        node("b", "echo", ("a",), value="$a"),
        node("c", "echo", ("b",), value="${b}!"),
    ]
    request = executor_pb2.RunRequest(run_id="crashed", plan=plan)
    # a finished before the crash (with an output a re-run would not give), b was in
    # flight, c not planned yet
    await crashed_run(db_url, request, plan[:2], {"a": "from-before"})

    spans = InMemorySpanExporter()
    # the new executor claims the expired run at start
    stack = await start_stack(database_url=db_url, span_processors=[SimpleSpanProcessor(spans)])
    try:
        client = ExecutorClient(channels.get(stack.executor_target))
        events = await collect(client.resume_run("crashed"))
        stored = await client.get_run("crashed")
    finally:
        await stack.stop()

    assert events[0].started.trace_id == "ab" * 16  # the run's one trace
    resumed = [s for s in spans.get_finished_spans() if s.name == "trellis.run"]
    assert len(resumed) == 1 and resumed[0].parent is not None
    assert format(resumed[0].context.trace_id, "032x") == "ab" * 16
    assert format(resumed[0].parent.span_id, "016x") == "cd" * 8  # under the original root
    tool_spans = [s for s in spans.get_finished_spans() if s.name.startswith("execute_tool")]
    assert tool_spans and {s.context.trace_id for s in tool_spans} == {int("ab" * 16, 16)}
    assert events[-1].finished.status == SUCCEEDED
    ended = outcomes(events)
    assert from_value(ended["a"].output) == "from-before"  # not run again
    assert from_value(ended["b"].output) == "from-before"  # ran, reading a's stored output
    assert from_value(ended["c"].output) == "from-before!"
    started = {
        e.node_started.node_id: e.node_started.attempt for e in events if e.HasField("node_started")
    }
    assert started == {"b": 2, "c": 1}  # b retried (same idempotency key), c new
    assert [c.node_id for c in stored.plan] == ["a", "b", "c"]
    assert stored.status == SUCCEEDED and len(stored.outcomes) == 3


async def test_resumed_goal_run_in_its_join_does_not_plan_again(db_url, channels, model) -> None:
    plan = [node("n1", "arithmetic", expression="6*7")]
    request = executor_pb2.RunRequest(run_id="joining", goal="What is 6*7?")
    usage = common_pb2.Usage(model=MODEL, input_tokens=100, output_tokens=20)
    progress = Progress(round=0, joining=True, usage=usage)
    await crashed_run(db_url, request, plan, {"n1": {"result": 42}}, progress)
    ledger = await open_ledger(
        db_url, PriceTable.load()
    )  # the dead replica's plan call is in the ledger
    try:
        await ledger.record(
            UsageEvent("joining/plan/0", "default", UsageKind.MODEL, run_id="joining",
                       model=MODEL, input_tokens=100, output_tokens=20)
        )  # fmt: skip
    finally:
        await ledger.close()

    stack = await start_stack(database_url=db_url, model_base_url=model.base_url)
    try:
        client = ExecutorClient(channels.get(stack.executor_target))
        events = await collect(client.resume_run("joining"))
        held = await CostsClient(channels.get(stack.target("costs"))).get_run_usage("joining")
    finally:
        await stack.stop()

    finished = events[-1].finished
    assert finished.status == SUCCEEDED and "42" in finished.answer
    prompts = [json.dumps(r["messages"]) for r in model.requests]
    assert len(prompts) == 1 and "## Outcomes" in prompts[0]  # one join, no new plan
    # what the run reports is what the ledger holds: the earlier replica's plan call too
    assert sorted(held.usage_ids) == ["joining/join/0/1", "joining/plan/0"]
    assert finished.usage.input_tokens > 100
    assert (finished.usage, finished.cost_nano_usd) == (held.model_usage, held.cost_nano_usd)


async def test_stopping_executor_hands_its_run_over_to_the_next(
    db_url, stack_on, serve, channels
) -> None:
    client = ExecutorClient(channels.get(stack_on.executor_target))
    plan = [node("slow", "sleep", ms=1500), node("after", "echo", ("slow",), value="$slow")]
    request = executor_pb2.RunRequest(run_id="handed-over", plan=plan)
    with pytest.raises(Unavailable) as moved:
        async for event in client.run(request):
            if event.HasField("node_started"):
                await stack_on.servers["executor"].stop(0)
    assert moved.value.reason == "RUN_MOVED"
    stored = await open_store(db_url)
    try:
        run = await stored.get("handed-over")
    finally:
        await stored.close()
    assert run is not None and run.status == RUNNING and not run.outcomes  # not CANCELLED

    # the same replica restarted: resumes its run at once, without waiting for a lease
    restarted = await second_executor(serve, stack_on, db_url, "exec-a")
    events = await asyncio.wait_for(collect(restarted.resume_run("handed-over")), 10)
    assert events[-1].finished.status == SUCCEEDED
    assert from_value(outcomes(events)["after"].output) == {"slept_ms": 1500}


async def test_resume_run_follows_a_run_executing_on_another_replica(
    db_url, stack_on, serve, channels
) -> None:
    a = ExecutorClient(channels.get(stack_on.executor_target))
    b = await second_executor(serve, stack_on, db_url, "exec-b", lease_seconds=0.6)
    plan = [node("s1", "sleep", ms=300), node("s2", "echo", ("s1",), value="$s1")]
    request = executor_pb2.RunRequest(run_id="elsewhere", plan=plan)
    first = asyncio.create_task(collect(a.run(request)))
    await asyncio.sleep(0.15)
    followed = await asyncio.wait_for(collect(b.resume_run("elsewhere")), 10)
    original = await first
    assert followed[0].started.trace_id == original[0].started.trace_id
    assert outcomes(followed) == outcomes(original)
    assert followed[-1].finished.status == SUCCEEDED
    assert kinds(followed).count("node_planned") == 2


async def test_a_run_whose_lease_is_taken_stops_here_and_writes_nothing(
    db_url, stack_on, channels
) -> None:
    client = ExecutorClient(channels.get(stack_on.executor_target))
    request = executor_pb2.RunRequest(run_id="stolen", plan=[node("slow", "sleep", ms=3000)])
    with pytest.raises(Unavailable) as moved:
        async for event in client.run(request):
            if event.HasField("node_started"):
                with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
                    db.execute("UPDATE runs SET owner = 'thief' WHERE run_id = 'stolen'")
    assert moved.value.reason == "RUN_MOVED"
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
        owner, status, finished = db.execute(
            "SELECT owner, status, finished FROM runs WHERE run_id = 'stolen'"
        ).fetchone()
        outcome = db.execute("SELECT outcome FROM run_nodes WHERE run_id = 'stolen'").fetchone()
    assert (owner, status, finished, outcome) == ("thief", RUNNING, None, (None,))


async def test_resume_run_errors(stack_on, channels) -> None:
    client = ExecutorClient(channels.get(stack_on.executor_target))
    with pytest.raises(NotFound) as missing:
        await collect(client.resume_run("no-such-run"))
    assert missing.value.reason == "RUN_NOT_FOUND"
    with pytest.raises(InvalidArgument) as empty:
        await collect(client.resume_run(""))
    assert empty.value.reason == "RUN_ID_REQUIRED"
    request = executor_pb2.RunRequest(run_id="finished", plan=[node("a", "echo", value=1)])
    first = await collect(client.run(request))
    replayed = await collect(client.resume_run("finished"))
    assert replayed[-1].finished.status == first[-1].finished.status == SUCCEEDED


async def test_invalid_streamed_node_ends_the_call_with_invalid_argument(
    channels, model, tmp_path
) -> None:
    script_of(model).reply(
        '{"node_id": "n1", "tool": "echo", "args": {"value": 1}, "depends_on": []}\n'
        '{"node_id": "n2", "tool": "rm_rf", "args": {}, "depends_on": []}\n',
        times=2,  # and the repair round
    )
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/r.db", model_base_url=model.base_url
    )
    try:
        client = ExecutorClient(channels.get(stack.executor_target))
        events: list[executor_pb2.RunResponse] = []
        with pytest.raises(InvalidArgument) as raised:
            async for event in client.run(executor_pb2.RunRequest(run_id="bad", goal="anything")):
                events.append(event)
        stored = await client.get_run("bad")
    finally:
        await stack.stop()
    assert raised.value.reason == "INVALID_PLAN"
    assert [v.field for v in raised.value.violations] == ["plan[1].tool"]
    planned = [e.node_planned.call.node_id for e in events if e.HasField("node_planned")]
    assert planned == ["n1"]  # the valid node before it ran; the invalid one never did
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_FAILED
    assert (stored.status, stored.error.code) == (executor_pb2.RUN_STATUS_FAILED, "INVALID_PLAN")


async def test_cancel_run_on_another_replica_reaches_the_owner(
    db_url, stack_on, serve, channels
) -> None:
    a = ExecutorClient(channels.get(stack_on.executor_target))
    b = await second_executor(serve, stack_on, db_url, "exec-b", lease_seconds=0.6)
    request = executor_pb2.RunRequest(run_id="cancel-me", plan=[node("long", "sleep", ms=10_000)])
    events: list[executor_pb2.RunResponse] = []
    started = asyncio.Event()

    async def follow() -> None:
        async for event in a.run(request):
            events.append(event)
            if event.HasField("node_started"):
                started.set()

    owner = asyncio.create_task(follow())
    await asyncio.wait_for(started.wait(), 10)
    response = await asyncio.wait_for(b.cancel_run("cancel-me"), 5)
    await asyncio.wait_for(owner, 5)
    assert response.status == executor_pb2.RUN_STATUS_CANCELLED
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_CANCELLED
    assert outcomes(events)["long"].status == common_pb2.NODE_STATUS_CANCELLED
