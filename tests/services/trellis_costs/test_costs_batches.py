"""RecordUsages: many events in one ledger transaction (each backend), each entry
idempotent on its usage_id with a result of its own; bad entries refused in their
result without refusing the others; the tenant from metadata; holds settled; the
headroom gauge published once per batch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from trellis.clients.costs import CostsClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime.context import request_scope
from trellis.runtime.errors import AlreadyExists, InvalidArgument
from trellis_costs.ledger import (
    Ledger,
    PostgresLedger,
    SqliteLedger,
    UsageEvent,
    UsageKind,
    open_ledger,
)
from trellis_costs.prices import PriceTable
from trellis_costs.service import NAME, build
from trellis_costs.settings import CostsSettings

TOOL = costs_pb2.USAGE_KIND_TOOL
MODEL = costs_pb2.USAGE_KIND_MODEL
WHEN = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)


def tool_event(usage_id: str, cost: int, tenant: str = "t1") -> UsageEvent:
    return UsageEvent(
        usage_id, tenant, UsageKind.TOOL, tool="echo", tool_cost_nano_usd=cost, occurred_at=WHEN
    )


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    opened = await open_ledger(ledger_url, PriceTable.load())
    yield opened
    await opened.close()


def count_transactions(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the ledger's write transactions (SQLite commits, PostgreSQL pool runs)."""
    seen: list[int] = []
    if isinstance(ledger, SqliteLedger):
        commit = ledger._db.commit

        async def counted_commit() -> None:
            seen.append(1)
            await commit()

        monkeypatch.setattr(ledger._db, "commit", counted_commit)
    else:
        assert isinstance(ledger, PostgresLedger)
        run = ledger._pool.run

        async def counted_run(*args, **kw):
            seen.append(1)
            return await run(*args, **kw)

        monkeypatch.setattr(ledger._pool, "run", counted_run)
    return seen


async def test_a_batch_is_one_transaction_with_a_result_per_event(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ledger.record(tool_event("before", 3))
    await ledger.record(tool_event("theirs", 9, tenant="t2"))
    commits = count_transactions(ledger, monkeypatch)
    results = await ledger.record_many(
        [
            tool_event("a", 10),
            tool_event("before", 99),  # recorded earlier: the stored cost, uncounted
            tool_event("b", 20),
            tool_event("a", 77),  # repeated in the batch: the first entry's row
            tool_event("theirs", 5),  # another tenant's id: refused, the rest stored
        ]
    )
    assert len(commits) == 1
    assert [(r.cost_nano_usd, r.duplicate) for r in results[:4]] == [
        (10, False),
        (3, True),
        (20, False),
        (10, True),
    ]
    assert isinstance(results[4], AlreadyExists) and results[4].reason == "USAGE_ID_TAKEN"
    report = await ledger.usage("t1", "2025-03-15", "2025-03-15")
    assert report.total_cost_nano_usd == 3 + 10 + 20
    assert report.rows[0].events == 3
    standing = await ledger.standing("t1", "2025-03-15", WHEN)
    assert standing.spent_today_nano_usd == 33  # the running totals took the batch


async def test_a_batch_settles_the_holds_of_its_events(ledger: Ledger) -> None:
    from trellis_costs.budgets import Budgets
    from trellis_costs.ledger import Budget

    budgets = Budgets(ledger, clock=lambda: WHEN)
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    assert (await budgets.check("t1", 300, reservation_id="a")).allowed
    assert (await budgets.check("t1", 300, reservation_id="b")).allowed
    assert await budgets.headroom("t1") == 400
    await budgets.record_many([tool_event("a", 100), tool_event("b", 50)])
    assert await budgets.headroom("t1") == 850  # both holds gone, real costs counted


# -- over gRPC ----------------------------------------------------------------------------


@pytest.fixture
async def costs(serve, channels, tmp_path: Path) -> CostsClient:
    server = await serve(
        NAME,
        build,
        CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{tmp_path}/costs.db"),
    )
    return CostsClient(channels.get(server.target))


def tool(usage_id: str, cost: int, **kw: object) -> costs_pb2.RecordUsageRequest:
    return costs_pb2.RecordUsageRequest(
        usage_id=usage_id, kind=TOOL, tool="echo", tool_cost_nano_usd=cost, run_id="r1", **kw
    )


def cost_metric() -> float:
    labels = {"model": "echo", "kind": "tool", "tenant": ""}
    return REGISTRY.get_sample_value("trellis_cost_usd_total", labels) or 0.0


async def test_record_usages_answers_every_entry_in_order(costs: CostsClient) -> None:
    with request_scope(tenant_id="other"):
        await costs.record_usage(tool("taken", 1, node_id="elsewhere"))
        await costs.record_usage(tool("theirs", 1))
    before = cost_metric()
    entries = [
        tool("u1", 1_000),
        tool("", 5),  # no usage_id
        costs_pb2.RecordUsageRequest(usage_id="u2", kind=MODEL),  # a model call without model
        tool("taken", 5),  # another tenant's id
        tool("u3", 2_000),
    ]
    with request_scope(tenant_id="acme"):
        answer = await costs.record_usages(entries)
        again = await costs.record_usages([tool("u1", 1_000), tool("u4", 4)])
        run = await costs.get_run_usage("r1")
    results = list(answer.results)
    assert [r.usage_id for r in results] == ["u1", "", "u2", "taken", "u3"]
    assert [(r.cost_nano_usd, r.duplicate, r.error.code) for r in results] == [
        (1_000, False, ""),
        (0, False, "USAGE_ID_REQUIRED"),
        (0, False, "INVALID_USAGE"),
        (0, False, "USAGE_ID_TAKEN"),
        (2_000, False, ""),
    ]
    assert "usage.model" in results[2].error.details
    assert [(r.cost_nano_usd, r.duplicate) for r in again.results] == [(1_000, True), (4, False)]
    assert sorted(run.usage_ids) == ["u1", "u3", "u4"]  # under the caller's tenant
    assert run.tool_cost_nano_usd == 3_004
    assert cost_metric() == pytest.approx(before + 3_004 / 1e9)  # repeats not counted
    with request_scope(tenant_id="other"):
        assert sorted((await costs.get_run_usage("r1")).usage_ids) == ["taken", "theirs"]


async def test_an_empty_or_oversized_batch_is_invalid(costs: CostsClient) -> None:
    for entries in ([], [tool(f"u{i}", 1) for i in range(1_001)]):
        with pytest.raises(InvalidArgument) as raised:
            await costs.record_usages(entries)
        assert raised.value.reason == "INVALID_USAGE_BATCH"


async def test_the_headroom_gauge_follows_a_batch(costs: CostsClient) -> None:
    def gauge() -> float | None:
        return REGISTRY.get_sample_value("trellis_budget_remaining_usd", {"tenant": "batch-gauged"})

    with request_scope(tenant_id="batch-gauged"):
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=10_000_000_000))
        await costs.record_usages([tool("g1", 1_000_000_000), tool("g2", 500_000_000)])
    assert gauge() == pytest.approx(8.5)
    assert common_pb2.Error().code == ""  # the results' error type is the common one
