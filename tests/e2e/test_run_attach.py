"""RunRequest.run_id is idempotent: a second Run with the same id follows the first run
(its events so far, then the rest), or replays it from the store once finished."""

from __future__ import annotations

import asyncio

import pytest

from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import AlreadyExists

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED


def node(node_id: str, tool: str, deps: tuple[str, ...] = (), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def kinds(events: list[executor_pb2.RunResponse]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def finished_ids(events: list[executor_pb2.RunResponse]) -> list[str]:
    return [e.node_finished.outcome.node_id for e in events if e.HasField("node_finished")]


async def collect(client: ExecutorClient, request: executor_pb2.RunRequest):
    return [event async for event in client.run(request)]


async def test_second_run_with_active_id_attaches_and_sees_the_rest(executor) -> None:
    plan = [node("slow", "sleep", ms=400), node("after", "echo", ("slow",), value="$slow")]
    request = executor_pb2.RunRequest(run_id="attach-me", plan=plan)
    first: list[executor_pb2.RunResponse] = []
    second: list[executor_pb2.RunResponse] = []
    started = asyncio.Event()

    async def follow_first() -> None:
        async for event in executor.run(request):
            first.append(event)
            if event.WhichOneof("event") == "node_started":
                started.set()

    owner = asyncio.create_task(follow_first())
    await asyncio.wait_for(started.wait(), 10)
    second = await collect(executor, request)  # attaches while "slow" is in flight
    await owner

    assert kinds(second)[0] == "started" and kinds(second)[-1] == "finished"
    assert second[0].started.trace_id == first[0].started.trace_id  # the same run, not a new one
    assert all(e.run_id == "attach-me" for e in second)
    assert second[-1].finished == first[-1].finished
    assert second[-1].finished.status == SUCCEEDED
    # the history first: the plan was stored and "slow" started before the attach
    assert kinds(second)[:4] == ["started", "node_planned", "node_planned", "node_started"]
    assert [e.node_started.node_id for e in second if e.HasField("node_started")] == [
        "slow",
        "after",
    ]
    assert finished_ids(second) == ["slow", "after"]
    assert second[1:] == first[1:]  # the same events, each once
    # every node ran once: the owner's stream saw each finish exactly once, as did the store
    assert finished_ids(first) == ["slow", "after"]
    stored = await executor.get_run("attach-me")
    assert [o.node_id for o in stored.outcomes] == ["slow", "after"]


async def test_second_run_with_finished_id_replays_the_stored_run(executor) -> None:
    plan = [node("a", "echo", value=1), node("b", "arithmetic", ("a",), expression="6*7")]
    request = executor_pb2.RunRequest(run_id="done-already", plan=plan)
    first = await collect(executor, request)
    assert first[-1].finished.status == SUCCEEDED
    before = await executor.get_run("done-already")

    replay = await collect(executor, request)

    assert kinds(replay) == ["started", *["node_planned"] * 2, *["node_finished"] * 2, "finished"]
    assert replay[0].started.trace_id == first[0].started.trace_id
    original = [e.node_finished.outcome for e in first if e.HasField("node_finished")]
    assert [e.node_finished.outcome for e in replay[3:5]] == original
    assert [e.node_planned.call for e in replay[1:3]] == plan
    ended, was = replay[-1].finished, first[-1].finished
    assert (ended.status, ended.answer, ended.cost_nano_usd, ended.cache_hits) == (
        was.status,
        was.answer,
        was.cost_nano_usd,
        was.cache_hits,
    )
    assert await executor.get_run("done-already") == before  # nothing ran again


async def test_failed_run_replays_its_error(executor) -> None:
    request = executor_pb2.RunRequest(
        run_id="cancelled-one", plan=[node("long", "sleep", ms=10_000)]
    )
    async for event in executor.run(request):
        if event.WhichOneof("event") == "node_started":
            await executor.cancel_run("cancelled-one")
    replay = await collect(executor, request)
    assert replay[-1].finished.status == executor_pb2.RUN_STATUS_CANCELLED
    assert replay[-1].finished.error.code == "CANCELLED"


async def test_another_tenants_run_id_is_taken_not_shared(executor) -> None:
    request = executor_pb2.RunRequest(run_id="mine", plan=[node("a", "echo", value=1)])
    with context.request_scope(tenant_id="acme"):
        await collect(executor, request)
    with context.request_scope(tenant_id="other"), pytest.raises(AlreadyExists) as raised:
        await collect(executor, request)
    assert raised.value.reason == "RUN_EXISTS"


async def test_new_run_id_starts_a_run(executor) -> None:
    request = executor_pb2.RunRequest(run_id="fresh", plan=[node("a", "echo", value=1)])
    events = await collect(executor, request)
    assert kinds(events)[:2] == ["started", "node_planned"]
    assert events[-1].finished.status == SUCCEEDED
