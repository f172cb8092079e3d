"""A model call cancelled mid-stream is still in the ledger: estimated, exactly once.

The core alone (cancelled task, closed generator, a second cancel during the write), then
through real gRPC: a client that goes away mid-stream from a slow offline model, a real
cost-accounting service, and its SQLite ledger read directly (``estimated`` is not in
the GetUsage report).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trellis.clients.costs import CostsClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.planner.v1 import planner_pb2, planner_pb2_grpc
from trellis.runtime.convert import to_struct, to_value
from trellis_costs import service as costs_service
from trellis_costs.settings import CostsSettings
from trellis_planner.core import CallStarted, CallUsage, Planner, PlanStarted
from trellis_planner.service import NAME, build
from trellis_planner.settings import PlannerSettings

DEMO = "Report this machine's OS, disk usage and uptime"
MODEL = "trellis-offline-rules-v1"


def plan_request(tools, run_id: str = "run-1") -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(run_id=run_id, goal=DEMO, tools=tools)


def join_request(run_id: str = "run-1") -> planner_pb2.JoinRequest:
    call = common_pb2.ToolCall(node_id="n1", tool="run_command", args=to_struct({"command": "x"}))
    outcome = common_pb2.NodeOutcome(
        node_id="n1",
        status=common_pb2.NODE_STATUS_SUCCEEDED,
        output=to_value({"stdout": "\n".join(f"line {i} of the output" for i in range(3))}),
    )
    return planner_pb2.JoinRequest(
        run_id=run_id, goal="What did it say?", plan=[call], outcomes=[outcome], round=1
    )


def is_content(item) -> bool:
    """A node or answer text, not a call's usage report."""
    return not isinstance(item, CallStarted | CallUsage | PlanStarted)


async def cancel_after_first_item(stream) -> None:
    """Consume ``stream`` in a task and cancel that task once the first node or answer
    piece arrived (the model call is then open and streaming)."""
    first = asyncio.Event()

    async def consume() -> None:
        async for item in stream:
            if is_content(item):
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- the core ----------------------------------------------------------------------------


async def test_cancelled_plan_records_estimated_usage(planner, tools, model, recorder):
    model.state.delay_ms = 20
    await cancel_after_first_item(planner.plan(plan_request(tools)))
    [recorded] = recorder.requests
    assert recorded.usage_id == "run-1/plan/0" and recorded.estimated
    assert recorded.usage.input_tokens > 0 and recorded.usage.output_tokens > 0


async def test_cancelled_join_records_estimated_usage(planner, model, recorder):
    model.state.delay_ms = 20
    await cancel_after_first_item(planner.join(join_request()))
    [recorded] = recorder.requests
    assert recorded.usage_id == "run-1/join/1" and recorded.estimated
    assert recorded.usage.output_tokens > 0


async def test_consumer_closing_the_stream_early_records_estimated_usage(
    planner, tools, model, recorder
):
    model.state.delay_ms = 5
    stream = planner.plan(plan_request(tools))
    assert isinstance(await anext(stream), PlanStarted)
    assert isinstance(await anext(stream), CallStarted)
    first = await anext(stream)
    assert first.node_id == "n1"
    await stream.aclose()  # GeneratorExit at the yield, not a cancellation
    [recorded] = recorder.requests
    assert recorded.estimated and recorded.usage_id == "run-1/plan/0"


@dataclass
class SlowRecorder:
    """A ledger that takes its time, to cancel the caller while the write is in flight."""

    writing: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[costs_pb2.RecordUsageRequest] = field(default_factory=list)

    async def record_usage(self, request):
        self.writing.set()
        await asyncio.sleep(0.2)
        self.requests.append(request)
        return costs_pb2.RecordUsageResponse(cost_nano_usd=1)


async def test_a_second_cancel_during_the_write_does_not_lose_it(
    chat_model, tools, model, make_outbox
):
    recorder = SlowRecorder()
    outbox = await make_outbox(recorder.record_usage)
    planner = Planner(chat_model, outbox, default_model=MODEL, max_nodes=50)
    model.state.delay_ms = 20
    first = asyncio.Event()

    async def consume() -> None:
        async for item in planner.plan(plan_request(tools)):
            if is_content(item):
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    await asyncio.wait_for(recorder.writing.wait(), 5)
    task.cancel()  # e.g. the server shutting down while the ledger write runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recorder.requests == []  # still being written ...
    await asyncio.sleep(0.4)
    [recorded] = recorder.requests  # ... and written
    assert recorded.estimated


# --- over gRPC, with the real cost-accounting service ----------------------------------


def ledger_rows(db: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT usage_id, estimated, output_tokens FROM usage ORDER BY usage_id"
        ).fetchall()


async def wait_for_rows(db: Path, count: int) -> list[tuple[str, int, int]]:
    """The ledger's rows once there are ``count`` of them (or after 5 s)."""
    deadline = time.monotonic() + 5.0
    while True:
        rows = ledger_rows(db)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.02)


@pytest.fixture
async def stack(serve, channels, model, tmp_path: Path):
    """(planner stub, costs client, ledger file): real planner and costs over gRPC."""
    db = tmp_path / "costs.db"
    costs = await serve(
        costs_service.NAME,
        costs_service.build,
        CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{db}"),
    )
    planner = await serve(
        NAME,
        build,
        PlannerSettings(
            port=0, metrics_port=0, openai_base_url=model.base_url, costs_target=costs.target
        ),
    )
    stub = planner_pb2_grpc.PlannerServiceStub(channels.get(planner.target))
    return stub, CostsClient(channels.get(costs.target)), db


async def test_plan_cancelled_by_the_client_is_in_the_ledger_once(stack, tools, model):
    stub, costs, db = stack
    model.state.delay_ms = 30  # the demo plan takes about 2 s to stream
    call = stub.Plan(plan_request(tools, run_id="gone"), timeout=30)
    assert (await call.read()).started.plan_format == common_pb2.PLAN_FORMAT_JSONL
    started = await call.read()
    assert (started.usage.usage_id, started.usage.started) == ("gone/plan/0", True)
    first = await call.read()
    assert first.node.node_id == "n1"
    call.cancel()  # the client goes away mid-stream

    [(usage_id, estimated, output_tokens)] = await wait_for_rows(db, 1)
    assert (usage_id, estimated) == ("gone/plan/0", 1)
    assert output_tokens > 0
    await asyncio.sleep(0.3)  # nothing else arrives later (no second row, no retry)
    assert len(ledger_rows(db)) == 1
    [row] = (await costs.get_usage()).rows
    assert (row.model, row.events) == (MODEL, 1)


async def test_join_cancelled_by_the_client_is_in_the_ledger_once(stack, model):
    stub, _, db = stack
    model.state.delay_ms = 30
    call = stub.Join(join_request(run_id="gone"), timeout=30)
    assert (await call.read()).usage.started
    first = await call.read()
    assert first.answer_delta
    call.cancel()

    [(usage_id, estimated, _)] = await wait_for_rows(db, 1)
    assert (usage_id, estimated) == ("gone/join/1", 1)
    await asyncio.sleep(0.3)
    assert len(ledger_rows(db)) == 1


async def test_a_plan_streamed_to_the_end_is_not_estimated(stack, tools):
    stub, _, db = stack
    responses = [r async for r in stub.Plan(plan_request(tools, run_id="whole"), timeout=30)]
    assert responses[-1].WhichOneof("event") == "done"
    assert [(u, e) for u, e, _ in ledger_rows(db)] == [("whole/plan/0", 0)]
