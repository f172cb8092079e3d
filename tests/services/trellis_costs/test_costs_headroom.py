"""trellis_budget_remaining_usd from every replica: published by the calls a replica
serves, and refreshed from the shared ledger for the tenants it did not (each backend)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from trellis_costs.budgets import Budgets
from trellis_costs.headroom import HeadroomGauge
from trellis_costs.ledger import Budget, Ledger, UsageEvent, UsageKind, open_ledger
from trellis_costs.prices import PriceTable


@pytest.fixture
async def ledgers(ledger_url: str) -> AsyncIterator[tuple[Ledger, Ledger]]:
    """Two connections (pools) to one database: two replicas'."""
    first = await open_ledger(ledger_url, PriceTable.load())
    second = await open_ledger(ledger_url, PriceTable.load())
    yield first, second
    await first.close()
    await second.close()


def gauge(tenant: str) -> float | None:
    return REGISTRY.get_sample_value("trellis_budget_remaining_usd", {"tenant": tenant})


def spend(usage_id: str, tenant: str, cost: int) -> UsageEvent:
    return UsageEvent(usage_id, tenant, UsageKind.TOOL, tool="t", tool_cost_nano_usd=cost)


async def test_a_replica_refreshes_what_other_replicas_changed(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    tenant = f"gauged-{uuid.uuid4().hex[:8]}"  # the registry is the process's: unique names
    here, there = Budgets(ledgers[0]), Budgets(ledgers[1])
    gauge_here = HeadroomGauge(here)
    await there.set_budget(Budget(tenant, daily_limit_nano_usd=2_000_000_000))
    await gauge_here.refresh()
    assert gauge(tenant) == 2.0

    await there.record(spend("u1", tenant, 500_000_000))
    await there.check(tenant, 250_000_000, reservation_id="u2")  # held there
    assert gauge(tenant) == 2.0  # nothing here has seen it yet
    await gauge_here.refresh()
    assert gauge(tenant) == pytest.approx(1.25)

    await there.set_budget(Budget(tenant))  # removed elsewhere: the series goes here too
    await gauge_here.refresh()
    assert gauge(tenant) is None


async def test_the_refresh_loop_runs_until_closed(ledgers: tuple[Ledger, Ledger]) -> None:
    tenant = f"looped-{uuid.uuid4().hex[:8]}"
    budgets = Budgets(ledgers[0])
    await budgets.set_budget(Budget(tenant, monthly_limit_nano_usd=3_000_000_000))
    headroom = HeadroomGauge(budgets, interval=0.01)
    headroom.start()
    try:
        for _ in range(500):
            if gauge(tenant) is not None:
                break
            await asyncio.sleep(0.01)
        assert gauge(tenant) == 3.0
    finally:
        await headroom.aclose()
