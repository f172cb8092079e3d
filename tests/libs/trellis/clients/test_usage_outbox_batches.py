"""The usage outbox coalesces: events submitted while a batch is under way go together
in one RecordUsages per tenant (flush when idle), each with its own outcome; an outage
loses nothing (the events are kept on disk and redelivered); a cost accounting without
RecordUsages gets one RecordUsage per event."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from trellis.clients.costs import CostsClient
from trellis.clients.usage_outbox import UsageOutbox
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.errors import Unimplemented
from trellis_costs.service import NAME as COSTS
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings


def event(usage_id: str, cost: int = 5, tool: str = "echo") -> costs_pb2.RecordUsageRequest:
    return costs_pb2.RecordUsageRequest(
        usage_id=usage_id,
        run_id="run-1",
        node_id="n1",
        kind=costs_pb2.USAGE_KIND_TOOL,
        tool=tool,
        tool_cost_nano_usd=cost,
    )


async def until(predicate: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


def ledger_rows(db: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT tenant_id, usage_id, cost_nano_usd FROM usage ORDER BY usage_id"
        ).fetchall()


class Costs:
    """Real cost accounting behind a switch (down: nothing listens), counting calls."""

    def __init__(self, live: CostsClient, dead: CostsClient) -> None:
        self.live, self.dead = live, dead
        self.up = True
        self.batches: list[tuple[str, int]] = []
        self.singles = 0
        #: Held while set: the batch under way waits (so the next ones queue up).
        self.gate: asyncio.Event | None = None

    @property
    def client(self) -> CostsClient:
        return self.live if self.up else self.dead

    async def record_usage(
        self, request: costs_pb2.RecordUsageRequest
    ) -> costs_pb2.RecordUsageResponse:
        self.singles += 1
        return await self.client.record_usage(request)

    async def record_usages(
        self, entries: Sequence[costs_pb2.RecordUsageRequest]
    ) -> costs_pb2.RecordUsagesResponse:
        self.batches.append((context.tenant(), len(entries)))
        if self.gate is not None:
            await self.gate.wait()
        return await self.client.record_usages(entries)


@pytest.fixture
async def costs(serve, channels, tmp_path: Path) -> Costs:
    server = await serve(
        COSTS,
        build_costs,
        CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{tmp_path}/ledger.db"),
    )
    return Costs(
        CostsClient(channels.get(server.target), timeout=2),
        CostsClient(channels.get("127.0.0.1:9"), timeout=2),  # nothing listens there
    )


async def open_outbox(tmp_path: Path, costs: Costs, **options: object) -> UsageOutbox:
    return await UsageOutbox.open(
        tmp_path / "outbox.db",
        costs.record_usage,
        batch_sender=costs.record_usages,
        first_retry=0.05,
        **options,
    )


async def test_many_submits_go_in_few_batches_each_with_its_own_outcome(
    costs: Costs, tmp_path: Path
) -> None:
    outbox = await open_outbox(tmp_path, costs)
    try:
        costs.gate = asyncio.Event()
        with context.request_scope(tenant_id="acme"):
            first = outbox.submit(event("acme/first", cost=1))
            await until(lambda: len(costs.batches) == 1)  # under way, held at the gate
            tasks = [outbox.submit(event(f"acme/{i:03}", cost=i)) for i in range(100)]
            bad = outbox.submit(event("acme/bad", tool="not a tool name!"))
        with context.request_scope(tenant_id="globex"):
            other = [outbox.submit(event(f"globex/{i}", cost=7)) for i in range(3)]
        await asyncio.sleep(0.05)
        # acme's rest wait for its batch under way; another tenant's batch goes at once
        assert sorted(costs.batches) == [("acme", 1), ("globex", 3)]
        costs.gate.set()
        responses = await asyncio.gather(first, *tasks, *other)
        assert await bad is None  # refused in its entry: dropped, the others recorded
    finally:
        await outbox.aclose()
    assert sorted(costs.batches) == [("acme", 1), ("acme", 101), ("globex", 3)]
    assert costs.singles == 0
    assert [r.cost_nano_usd for r in responses] == [1, *range(100), 7, 7, 7]
    stored = ledger_rows(tmp_path / "ledger.db")
    assert len(stored) == 104
    assert ("globex", "globex/0", 7) in stored and ("acme", "acme/099", 99) in stored
    assert all(usage_id != "acme/bad" for _, usage_id, _ in stored)
    assert outbox.pending == 0


async def test_nothing_is_lost_while_cost_accounting_is_down(costs: Costs, tmp_path: Path) -> None:
    outbox = await open_outbox(tmp_path, costs)
    outbox.start()
    try:
        costs.up = False
        with context.request_scope(tenant_id="acme"):
            kept = await asyncio.gather(*(outbox.submit(event(f"u{i}")) for i in range(20)))
        assert kept == [None] * 20  # kept for later, not delivered
        assert outbox.pending == 20
        costs.up = True
        await until(lambda: outbox.pending == 0)
        with context.request_scope(tenant_id="acme"):  # and fresh ones go at once
            assert (await outbox.send(event("fresh", cost=3))).cost_nano_usd == 3
    finally:
        await outbox.aclose()
    stored = ledger_rows(tmp_path / "ledger.db")
    assert [u for _, u, _ in stored] == sorted(["fresh", *(f"u{i}" for i in range(20))])
    assert {tenant for tenant, _, _ in stored} == {"acme"}


async def test_a_graceful_stop_delivers_what_is_queued(costs: Costs, tmp_path: Path) -> None:
    outbox = await open_outbox(tmp_path, costs, flush_seconds=5)
    with context.request_scope(tenant_id="acme"):
        for i in range(30):
            outbox.submit(event(f"u{i}"))
    await outbox.aclose()
    assert len(ledger_rows(tmp_path / "ledger.db")) == 30
    assert costs.batches  # delivered in batches, not one call each
    assert len(costs.batches) < 30


async def test_zero_cost_tool_usage_waits_for_company_and_a_stop_sends_it(
    costs: Costs, tmp_path: Path
) -> None:
    outbox = await open_outbox(tmp_path, costs, free_window=30.0, flush_seconds=5)
    try:
        with context.request_scope(tenant_id="acme"):
            free = [outbox.submit(event(f"free{i}", cost=0)) for i in range(3)]
            await asyncio.sleep(0.1)
            assert costs.batches == []  # nothing spent: no RecordUsages of its own
            paid = await outbox.send(event("paid", cost=9))  # goes at once, with them
            assert paid is not None and paid.cost_nano_usd == 9
            assert costs.batches == [("acme", 4)]
            assert all(task.done() for task in free)
            later = outbox.submit(event("free-later", cost=0))
            await asyncio.sleep(0.1)
            assert not later.done()
    finally:
        await asyncio.wait_for(outbox.aclose(), 5.0)  # a graceful stop does not wait 30 s
    assert costs.batches == [("acme", 4), ("acme", 1)]
    assert [u for _, u, _ in ledger_rows(tmp_path / "ledger.db")] == [
        "free-later",
        "free0",
        "free1",
        "free2",
        "paid",
    ]


async def test_without_record_usages_each_event_goes_alone(tmp_path: Path) -> None:
    taken: list[str] = []

    async def single(request: costs_pb2.RecordUsageRequest) -> costs_pb2.RecordUsageResponse:
        taken.append(request.usage_id)
        return costs_pb2.RecordUsageResponse(cost_nano_usd=request.tool_cost_nano_usd)

    async def old_service(
        entries: Sequence[costs_pb2.RecordUsageRequest],
    ) -> costs_pb2.RecordUsagesResponse:
        raise Unimplemented("no RecordUsages here")

    outbox = await UsageOutbox.open(tmp_path / "o.db", single, batch_sender=old_service)
    try:
        responses = await asyncio.gather(*(outbox.send(event(f"u{i}", cost=i)) for i in range(5)))
    finally:
        await outbox.aclose()
    assert [r.cost_nano_usd for r in responses] == list(range(5))
    assert sorted(taken) == [f"u{i}" for i in range(5)]


def test_an_entry_error_is_a_permanent_refusal() -> None:
    from trellis.clients.usage_outbox import _entry_outcome, is_permanent

    taken = _entry_outcome(
        costs_pb2.RecordUsageResult(
            usage_id="u", error=common_pb2.Error(code="USAGE_ID_TAKEN", message="taken")
        )
    )
    invalid = _entry_outcome(
        costs_pb2.RecordUsageResult(usage_id="u", error=common_pb2.Error(code="INVALID_USAGE"))
    )
    assert isinstance(taken, Exception) and is_permanent(taken) and taken.reason == "USAGE_ID_TAKEN"
    assert isinstance(invalid, Exception) and is_permanent(invalid)
