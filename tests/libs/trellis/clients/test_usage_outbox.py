"""The durable usage outbox: kept on disk when cost accounting cannot take an event,
redelivered later (also by the next process), under the original tenant, with backoff;
permanent refusals reported, not retried; nothing in flight lost on a graceful stop."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from trellis.clients.costs import CostsClient
from trellis.clients.usage_outbox import UsageOutbox, backoff_delay, validate_outbox_path
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.errors import Internal, InvalidArgument, Unavailable
from trellis_costs.service import NAME as COSTS
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings


def event(usage_id: str, *, tool: str = "echo", cost: int = 5) -> costs_pb2.RecordUsageRequest:
    return costs_pb2.RecordUsageRequest(
        usage_id=usage_id,
        run_id="run-1",
        node_id="n1",
        kind=costs_pb2.USAGE_KIND_TOOL,
        tool=tool,
        tool_cost_nano_usd=cost,
    )


def deliveries(outcome: str) -> float:
    return REGISTRY.get_sample_value("trellis_usage_deliveries_total", {"outcome": outcome}) or 0.0


def rows(path: Path) -> list[tuple[str, str, int]]:
    """(tenant, usage_id, attempts) of the rows in an outbox file, read directly."""
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT tenant_id, usage_id, attempts FROM usage_outbox ORDER BY seq"
        ).fetchall()


@dataclass
class Ledger:
    """A sender standing in for cost accounting: takes events, or fails as told."""

    error: Exception | None = None
    taken: list[tuple[str, costs_pb2.RecordUsageRequest]] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def record_usage(
        self, request: costs_pb2.RecordUsageRequest
    ) -> costs_pb2.RecordUsageResponse:
        self.calls.append(time.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.taken.append((context.tenant(), request))
        return costs_pb2.RecordUsageResponse(cost_nano_usd=request.tool_cost_nano_usd)


@pytest.fixture
async def open_outbox(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """``await open_outbox(ledger, **options)``: an outbox on ``tmp_path/outbox.db``."""
    opened: list[UsageOutbox] = []

    async def open_(ledger: Ledger, **options: object) -> UsageOutbox:
        outbox = await UsageOutbox.open(tmp_path / "outbox.db", ledger.record_usage, **options)
        opened.append(outbox)
        return outbox

    yield open_
    for outbox in opened:
        await outbox.aclose()


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


async def test_delivered_at_once_leaves_nothing_behind(open_outbox, tmp_path) -> None:
    ledger = Ledger()
    outbox = await open_outbox(ledger)
    before = deliveries("delivered")
    response = await outbox.send(event("u1", cost=7))
    assert response is not None and response.cost_nano_usd == 7
    assert [r.usage_id for _, r in ledger.taken] == ["u1"]
    assert rows(tmp_path / "outbox.db") == []
    assert deliveries("delivered") == before + 1


async def test_kept_on_disk_and_delivered_by_a_new_instance(open_outbox, tmp_path) -> None:
    down = Ledger(error=Unavailable("costs is down"))
    first = await open_outbox(down)  # its loop never runs: only the new instance delivers
    queued = deliveries("queued")
    sent = event("u1", cost=42)
    with context.request_scope(tenant_id="acme"):
        assert await first.send(sent) is None
    assert rows(tmp_path / "outbox.db") == [("acme", "u1", 1)]
    assert deliveries("queued") == queued + 1
    await first.aclose()

    up = Ledger()
    second = await open_outbox(up)
    assert second.pending == 1
    redelivered = deliveries("redelivered")
    second.start()
    await until(lambda: len(up.taken) == 1)
    [(tenant, request)] = up.taken
    assert tenant == "acme"  # x-tenant-id of the original call, not the loop's default
    assert request.SerializeToString() == sent.SerializeToString()
    await until(lambda: second.pending == 0)
    assert rows(tmp_path / "outbox.db") == []
    assert deliveries("redelivered") == redelivered + 1


async def test_a_permanent_refusal_is_reported_and_not_retried(open_outbox, tmp_path) -> None:
    refusing = Ledger(error=InvalidArgument("bad event", reason="INVALID_USAGE"))
    outbox = await open_outbox(refusing, first_retry=0.02)
    outbox.start()
    rejected = deliveries("rejected")
    assert await outbox.send(event("u1")) is None
    await asyncio.sleep(0.2)  # ten first-retry intervals
    assert len(refusing.calls) == 1
    assert rows(tmp_path / "outbox.db") == []
    assert deliveries("rejected") == rejected + 1


async def test_a_stored_event_refused_for_good_leaves_the_outbox(open_outbox, tmp_path) -> None:
    ledger = Ledger(error=Unavailable("down"))
    outbox = await open_outbox(ledger, first_retry=0.02)
    assert await outbox.send(event("u1")) is None
    ledger.error = InvalidArgument("bad event")
    rejected = deliveries("rejected")
    outbox.start()
    await until(lambda: outbox.pending == 0)
    assert rows(tmp_path / "outbox.db") == []
    assert deliveries("rejected") == rejected + 1


async def test_tenant_is_preserved_on_redelivery_through_real_cost_accounting(
    serve, channels, tmp_path
) -> None:
    """Over real gRPC: the channel interceptor sends x-tenant-id from the request scope,
    and the ledger files the row under it, also when the loop redelivers it."""
    ledger_db = tmp_path / "ledger.db"
    costs = await serve(
        COSTS,
        build_costs,
        CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{ledger_db}"),
    )
    live = CostsClient(channels.get(costs.target), timeout=2)
    dead = CostsClient(channels.get("127.0.0.1:9"), timeout=2)  # nothing listens there
    target = {"client": dead}

    async def sender(request: costs_pb2.RecordUsageRequest) -> costs_pb2.RecordUsageResponse:
        return await target["client"].record_usage(request)

    outbox = await UsageOutbox.open(tmp_path / "outbox.db", sender, first_retry=0.05)
    try:
        with context.request_scope(tenant_id="acme"):
            assert await outbox.send(event("acme/u1", tool="web_search", cost=3000)) is None
        with context.request_scope(tenant_id="globex"):
            assert await outbox.send(event("globex/u1", tool="web_search", cost=5)) is None
        assert [(t, u) for t, u, _ in rows(tmp_path / "outbox.db")] == [
            ("acme", "acme/u1"),
            ("globex", "globex/u1"),
        ]
        target["client"] = live
        outbox.start()
        await until(lambda: outbox.pending == 0, within=20)
    finally:
        await outbox.aclose()
    with sqlite3.connect(ledger_db) as conn:
        stored = conn.execute(
            "SELECT tenant_id, usage_id, tool, cost_nano_usd FROM usage ORDER BY usage_id"
        ).fetchall()
    assert stored == [
        ("acme", "acme/u1", "web_search", 3000),
        ("globex", "globex/u1", "web_search", 5),
    ]
    with context.request_scope(tenant_id="acme"):
        report = await live.get_usage()
    assert report.total_cost_nano_usd == 3000


async def test_in_flight_at_stop_ends_in_the_outbox(open_outbox, tmp_path) -> None:
    hung = Ledger(gate=asyncio.Event())  # cost accounting that never answers
    outbox = await open_outbox(hung, flush_seconds=0.05, send_timeout=30)
    background = outbox.submit(event("bg"))
    with context.request_scope(tenant_id="acme"):
        waiting = asyncio.create_task(outbox.send(event("fg")))
    await until(lambda: len(hung.calls) == 2)
    await outbox.aclose()
    assert await background is None and await waiting is None
    assert sorted(rows(tmp_path / "outbox.db")) == [("acme", "fg", 1), ("default", "bg", 1)]


async def test_a_send_during_the_stop_is_kept_not_lost(open_outbox, tmp_path) -> None:
    hung = Ledger(gate=asyncio.Event())
    outbox = await open_outbox(hung, flush_seconds=0.2, send_timeout=30)
    outbox.submit(event("first"))
    await until(lambda: len(hung.calls) == 1)
    closing = asyncio.create_task(outbox.aclose())
    await asyncio.sleep(0.05)  # aclose is flushing
    late = outbox.submit(event("late"))
    await closing
    assert await late is None
    assert sorted(u for _, u, _ in rows(tmp_path / "outbox.db")) == ["first", "late"]
    assert len(hung.calls) == 1  # the late one was not even tried


async def test_cancelling_the_caller_does_not_cancel_the_delivery(open_outbox) -> None:
    slow = Ledger(gate=asyncio.Event())
    outbox = await open_outbox(slow)
    caller = asyncio.create_task(outbox.send(event("u1")))
    await until(lambda: len(slow.calls) == 1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    slow.gate.set()
    await until(lambda: len(slow.taken) == 1)


async def test_redelivery_is_oldest_first_and_a_repeat_is_kept_once(open_outbox, tmp_path) -> None:
    ledger = Ledger(error=Unavailable("down"))
    outbox = await open_outbox(ledger, first_retry=0.02)
    for usage_id in ("a", "b", "a", "c"):
        assert await outbox.send(event(usage_id)) is None
    assert [u for _, u, _ in rows(tmp_path / "outbox.db")] == ["a", "b", "c"]
    assert outbox.pending == 3
    ledger.error = None
    outbox.start()
    await until(lambda: outbox.pending == 0)
    assert [r.usage_id for _, r in ledger.taken] == ["a", "b", "c"]


async def test_a_row_that_keeps_failing_does_not_hold_the_others_back(open_outbox) -> None:
    @dataclass
    class Picky(Ledger):
        async def record_usage(self, request):
            if request.usage_id == "poison":
                self.calls.append(time.monotonic())
                raise Internal("the ledger chokes on this one")
            return await super().record_usage(request)

    ledger = Picky(error=Unavailable("down"))
    outbox = await open_outbox(ledger, first_retry=0.02, max_retry=0.05)
    for usage_id in ("poison", "a", "b"):
        assert await outbox.send(event(usage_id)) is None
    ledger.error = None
    outbox.start()
    await until(lambda: len(ledger.taken) == 2)
    assert [r.usage_id for _, r in ledger.taken] == ["a", "b"]
    assert outbox.pending == 1  # still kept, still retried
    tried = len(ledger.calls)
    await until(lambda: len(ledger.calls) > tried + 1)


async def test_a_fresh_delivery_makes_waiting_rows_due_at_once(open_outbox) -> None:
    """Cost accounting is back as soon as any call gets through: the rows waiting out a
    long backoff go right away instead of at their next attempt."""
    ledger = Ledger(error=Unavailable("down"))
    outbox = await open_outbox(ledger, first_retry=60, max_retry=60)
    assert await outbox.send(event("old")) is None
    outbox.start()
    await asyncio.sleep(0.1)
    assert ledger.taken == []  # waiting out its backoff (30 to 60 s)
    ledger.error = None
    assert await outbox.send(event("new")) is not None
    await until(lambda: outbox.pending == 0, within=5)
    assert [r.usage_id for _, r in ledger.taken] == ["new", "old"]


async def test_retries_back_off_exponentially(open_outbox, tmp_path) -> None:
    ledger = Ledger(error=Unavailable("down"))
    outbox = await open_outbox(ledger, first_retry=0.04, max_retry=0.16, rng=random.Random(7))
    assert await outbox.send(event("u1")) is None
    outbox.start()
    await until(lambda: len(ledger.calls) >= 6, within=10)
    gaps = [b - a for a, b in zip(ledger.calls, ledger.calls[1:], strict=False)]
    # each wait is at least half of first_retry * 2**(n-1), capped at max_retry
    floors = [min(0.16, 0.04 * 2**n) / 2 for n in range(len(gaps))]
    assert all(gap >= floor * 0.95 for gap, floor in zip(gaps, floors, strict=True)), gaps
    assert rows(tmp_path / "outbox.db")[0][2] >= 6  # attempts are counted on the row
    assert max(gaps[3:]) < 1.0  # capped (0.16 s, plus scheduling slack), not still doubling


def test_backoff_delay_doubles_with_equal_jitter_up_to_the_cap() -> None:
    rng = random.Random(1)
    for attempts, low, high in [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (9, 15.0, 30.0)]:
        delays = [backoff_delay(attempts, 1.0, 30.0, rng) for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high
        assert max(delays) - min(delays) > (high - low) / 2  # jittered, not fixed


def test_outbox_path_must_be_a_file(tmp_path: Path) -> None:
    assert validate_outbox_path(tmp_path / "o.db") == tmp_path / "o.db"
    (tmp_path / "a-file").write_text("")
    for bad in (Path(":memory:"), tmp_path, Path(""), tmp_path / "a-file" / "o.db"):
        with pytest.raises(ValueError):
            validate_outbox_path(bad)


async def test_model_usage_is_logged_in_full_when_refused(open_outbox, monkeypatch) -> None:
    """A refusal drops the event, so the log line must carry all of it."""
    import structlog
    from structlog.testing import capture_logs

    from trellis.clients import usage_outbox

    refusing = Ledger(error=InvalidArgument("bad"))
    outbox = await open_outbox(refusing)
    request = costs_pb2.RecordUsageRequest(
        usage_id="r/plan/0",
        run_id="r",
        kind=costs_pb2.USAGE_KIND_MODEL,
        usage=common_pb2.Usage(model="gpt-4o", input_tokens=10, output_tokens=3),
    )
    with capture_logs() as logs:
        # a logger bound now: the module's may be cached from an earlier test's set-up
        monkeypatch.setattr(usage_outbox, "log", structlog.get_logger(usage_outbox.__name__))
        assert await outbox.send(request) is None
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert line["usage_id"] == "r/plan/0"
    assert (line["model"], line["input_tokens"], line["output_tokens"]) == ("gpt-4o", 10, 3)
