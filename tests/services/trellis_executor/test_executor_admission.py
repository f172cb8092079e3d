"""Admission control: beyond ``max_active_runs`` a new Run is refused at once with
RESOURCE_EXHAUSTED (RUN_CAPACITY) and a RetryInfo, never queued until its deadline;
following an existing run is not a new one; a freed slot admits the next run."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import from_rpc_error
from trellis_cli.stack import Stack, start_stack

#: The refused call's deadline: were it queued instead of refused, it would run into it.
REFUSED_CALL_DEADLINE = 20.0


async def rest(call: aio.UnaryStreamCall) -> list[executor_pb2.RunResponse]:
    """The remaining events of a call already read with ``read()`` (the APIs cannot mix)."""
    events = []
    while (event := await call.read()) is not aio.EOF:
        events.append(event)
    return events


def sleep_plan(ms: int) -> list[common_pb2.ToolCall]:
    return [common_pb2.ToolCall(node_id="nap", tool="sleep", args=to_struct({"ms": ms}))]


def echo_plan() -> list[common_pb2.ToolCall]:
    return [common_pb2.ToolCall(node_id="say", tool="echo", args=to_struct({"value": "hi"}))]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = await start_stack(database_url=f"sqlite:///{tmp_path}/runs.db", max_active_runs=2)
    yield running
    await running.stop()


@pytest.fixture
async def stub(stack: Stack) -> AsyncIterator[executor_pb2_grpc.ExecutorServiceStub]:
    async with aio.insecure_channel(stack.executor_target) as channel:
        yield executor_pb2_grpc.ExecutorServiceStub(channel)


async def test_run_beyond_capacity_is_refused_at_once_and_a_freed_slot_admits(stub) -> None:
    # two runs that only end when cancelled (a 60 s nap) fill both slots
    blockers = {
        run_id: stub.Run(
            executor_pb2.RunRequest(run_id=run_id, plan=sleep_plan(60_000)), timeout=120
        )
        for run_id in ("block-a", "block-b")
    }
    for call in blockers.values():
        first = await call.read()
        assert first.WhichOneof("event") == "started"

    began = time.monotonic()
    third = stub.Run(
        executor_pb2.RunRequest(run_id="third", plan=echo_plan()), timeout=REFUSED_CALL_DEADLINE
    )
    with pytest.raises(aio.AioRpcError) as refused:
        async for _ in third:
            pass
    waited = time.monotonic() - began

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = from_rpc_error(refused.value)
    assert error.reason == "RUN_CAPACITY"
    assert error.metadata == {"max_active_runs": "2"}
    assert error.retry_delay is not None and error.retry_delay > 0
    # refused, not queued: nowhere near its deadline, and nothing was stored for it
    assert waited < REFUSED_CALL_DEADLINE / 2
    with pytest.raises(aio.AioRpcError) as missing:
        await stub.GetRun(executor_pb2.GetRunRequest(run_id="third"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    for run_id in blockers:
        stored = await stub.GetRun(executor_pb2.GetRunRequest(run_id=run_id), timeout=10)
        assert stored.run.status == executor_pb2.RUN_STATUS_RUNNING

    # following a run that exists is not a new run: attaching works at capacity
    attach = stub.Run(
        executor_pb2.RunRequest(run_id="block-a", plan=sleep_plan(60_000)), timeout=30
    )
    attached = await attach.read()
    assert attached.WhichOneof("event") == "started" and attached.run_id == "block-a"
    attach.cancel()

    # cancelling one blocker frees its slot once its stream has ended
    cancelled = await stub.CancelRun(executor_pb2.CancelRunRequest(run_id="block-a"), timeout=30)
    assert cancelled.status == executor_pb2.RUN_STATUS_CANCELLED
    ended = await rest(blockers["block-a"])
    assert ended[-1].finished.status == executor_pb2.RUN_STATUS_CANCELLED

    admitted = [
        event
        async for event in stub.Run(
            executor_pb2.RunRequest(run_id="fourth", plan=echo_plan()), timeout=30
        )
    ]
    assert admitted[0].WhichOneof("event") == "started"
    assert admitted[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED

    # the other blocker still held its slot the whole time
    await stub.CancelRun(executor_pb2.CancelRunRequest(run_id="block-b"), timeout=30)
    remaining = await rest(blockers["block-b"])
    assert remaining[-1].finished.status == executor_pb2.RUN_STATUS_CANCELLED


async def test_replaying_a_finished_run_is_not_refused_at_capacity(stub) -> None:
    done = [
        e
        async for e in stub.Run(
            executor_pb2.RunRequest(run_id="done", plan=echo_plan()), timeout=30
        )
    ]
    assert done[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED
    blockers = [
        stub.Run(executor_pb2.RunRequest(run_id=f"hold-{i}", plan=sleep_plan(60_000)), timeout=120)
        for i in range(2)
    ]
    for call in blockers:
        assert (await call.read()).WhichOneof("event") == "started"

    replay = [
        e
        async for e in stub.Run(
            executor_pb2.RunRequest(run_id="done", plan=echo_plan()), timeout=30
        )
    ]
    assert replay[0].started.trace_id == done[0].started.trace_id  # the same run, replayed
    assert replay[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED

    for i, call in enumerate(blockers):
        await stub.CancelRun(executor_pb2.CancelRunRequest(run_id=f"hold-{i}"), timeout=30)
        assert (await rest(call))[-1].finished.status == executor_pb2.RUN_STATUS_CANCELLED
