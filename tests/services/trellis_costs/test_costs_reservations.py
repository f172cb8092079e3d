"""Budget reservations under load, against a real cost-accounting gRPC server on each
ledger backend: parallel callers cannot spend the same headroom twice.

Every caller does what a model or tool call does: CheckBudget with its estimate and
its usage id as reservation_id, then (if allowed) RecordUsage under that id. Tool
usage, so the test sets the real cost exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from trellis.clients.costs import CostsClient
from trellis.costs.v1 import costs_pb2
from trellis.runtime.context import request_scope
from trellis.runtime.convert import timestamp
from trellis_costs.service import NAME, build
from trellis_costs.settings import CostsSettings

TOOL = costs_pb2.USAGE_KIND_TOOL
CALLERS = 50
LIMIT = 1_000_000
ESTIMATE = 30_000  # 33 calls fit under LIMIT; 50 callers want 1,500,000

StartCosts = Callable[..., Awaitable[CostsClient]]


@pytest.fixture
def start_costs(serve, channels, ledger_url: str) -> StartCosts:
    """``await start_costs(**settings)``: a costs server over this test's ledger."""

    async def start(**overrides: object) -> CostsClient:
        settings = CostsSettings(port=0, metrics_port=0, database_url=ledger_url, **overrides)
        server = await serve(NAME, build, settings)
        return CostsClient(channels.get(server.target))

    return start


def tool_usage(usage_id: str, cost: int, **kw: object) -> costs_pb2.RecordUsageRequest:
    return costs_pb2.RecordUsageRequest(
        usage_id=usage_id, kind=TOOL, tool="probe", tool_cost_nano_usd=cost, **kw
    )


async def parallel_callers(
    costs: CostsClient,
    actual: Callable[[int], int],
    *,
    reserve: bool,
    together: bool,
) -> int:
    """Run CALLERS callers at once; returns how many were allowed.

    ``together``: every caller checks before any records (all holds outstanding at
    once, the worst case); otherwise each records as soon as its own check returns.
    """
    barrier = asyncio.Barrier(CALLERS) if together else None

    async def caller(i: int) -> bool:
        usage_id = f"call-{i}"
        check = await costs.check_budget(ESTIMATE, reservation_id=usage_id if reserve else "")
        if barrier is not None:
            await barrier.wait()
        if check.allowed:
            await costs.record_usage(tool_usage(usage_id, actual(i)))
        return check.allowed

    return sum(await asyncio.gather(*(caller(i) for i in range(CALLERS))))


async def spent(costs: CostsClient) -> int:
    """What the ledger holds for the tenant today (the truth, not the view)."""
    return (await costs.get_usage()).total_cost_nano_usd


@pytest.mark.parametrize("together", [True, False], ids=["check-all-first", "interleaved"])
async def test_reservations_let_exactly_what_fits_through(
    start_costs: StartCosts, together: bool
) -> None:
    costs = await start_costs()
    with request_scope(tenant_id="parallel"):
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=LIMIT))
        allowed = await parallel_callers(costs, lambda i: ESTIMATE, reserve=True, together=together)
        total = await spent(costs)
        after = await costs.check_budget(0)
    assert allowed == LIMIT // ESTIMATE == 33
    assert total == allowed * ESTIMATE <= LIMIT + ESTIMATE
    assert (after.spent_today_nano_usd, after.reserved_nano_usd) == (total, 0)
    assert after.remaining_nano_usd == LIMIT - total


@pytest.mark.parametrize("together", [True, False], ids=["check-all-first", "interleaved"])
async def test_actual_costs_below_estimates_stay_within_one_estimate(
    start_costs: StartCosts, together: bool
) -> None:
    costs = await start_costs()
    with request_scope(tenant_id="cheaper"):
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=LIMIT))
        allowed = await parallel_callers(
            costs, lambda i: ESTIMATE - (i % 7) * 1_000, reserve=True, together=together
        )
        total = await spent(costs)
    assert allowed >= LIMIT // ESTIMATE
    assert total <= LIMIT + ESTIMATE
    if together:  # every estimate was held at once: exactly what fits got through
        assert allowed == LIMIT // ESTIMATE


async def test_without_reservations_parallel_callers_overshoot(start_costs: StartCosts) -> None:
    costs = await start_costs()
    with request_scope(tenant_id="unreserved"):
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=LIMIT))
        allowed = await parallel_callers(costs, lambda i: ESTIMATE, reserve=False, together=True)
        total = await spent(costs)
    # Every check saw the same untouched headroom: all went through.
    assert allowed == CALLERS
    assert total == CALLERS * ESTIMATE > LIMIT + ESTIMATE


async def test_expired_holds_are_released(start_costs: StartCosts) -> None:
    costs = await start_costs(budget_reservation_seconds=0.3)
    with request_scope(tenant_id="forgetful"):
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=LIMIT))
        assert (await costs.check_budget(LIMIT, reservation_id="never-recorded")).allowed
        held = await costs.check_budget(1)
        assert (held.allowed, held.reserved_nano_usd) == (False, LIMIT)
        await asyncio.sleep(0.35)
        released = await costs.check_budget(LIMIT)
        assert (released.allowed, released.reserved_nano_usd) == (True, 0)


async def test_a_duplicate_record_usage_counts_once(start_costs: StartCosts) -> None:
    costs = await start_costs()
    with request_scope(tenant_id="retrying"):
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=LIMIT))
        assert (await costs.check_budget(ESTIMATE, reservation_id="u1")).allowed
        first = await costs.record_usage(tool_usage("u1", ESTIMATE))
        again = await costs.record_usage(tool_usage("u1", ESTIMATE))
        assert (first.duplicate, again.duplicate) == (False, True)
        check = await costs.check_budget(0)
        assert (check.spent_today_nano_usd, check.reserved_nano_usd) == (ESTIMATE, 0)
        assert check.remaining_nano_usd == LIMIT - ESTIMATE
        [row] = (await costs.get_usage()).rows
        assert (row.events, row.cost_nano_usd) == (1, ESTIMATE)


async def test_monthly_limit_is_enforced_independently_of_the_daily_one(
    start_costs: StartCosts,
) -> None:
    costs = await start_costs()
    now = datetime.now(UTC)
    last_month = now.replace(day=1) - timedelta(days=1)
    with request_scope(tenant_id="monthly"):
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(
                daily_limit_nano_usd=LIMIT, monthly_limit_nano_usd=LIMIT // 2
            )
        )
        await costs.record_usage(tool_usage("old", LIMIT, occurred_at=timestamp(last_month)))
        await costs.record_usage(tool_usage("now", LIMIT // 2 - 10))
        check = await costs.check_budget(11)
        assert (check.spent_today_nano_usd, check.spent_this_month_nano_usd) == (
            LIMIT // 2 - 10,
            LIMIT // 2 - 10,
        )
        # Far under the daily limit, but only 10 left this month.
        assert (check.allowed, check.remaining_nano_usd) == (False, 10)
        assert (await costs.check_budget(10)).allowed

        # And the other way round: the day is spent while the month has room.
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(
                daily_limit_nano_usd=LIMIT // 2, monthly_limit_nano_usd=LIMIT
            )
        )
        await costs.record_usage(tool_usage("now2", 10))
        day_spent = await costs.check_budget(0)
        assert (day_spent.allowed, day_spent.remaining_nano_usd) == (False, 0)


async def test_replicas_on_one_postgresql_share_holds_spend_and_budgets(
    serve, channels, postgres_url: str
) -> None:
    """What one replica holds, records or sets counts at the other on its next call."""

    async def replica() -> CostsClient:
        settings = CostsSettings(port=0, metrics_port=0, database_url=postgres_url)
        return CostsClient(channels.get((await serve(NAME, build, settings)).target))

    here, there = await replica(), await replica()
    with request_scope(tenant_id="shared"):
        await here.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=LIMIT))
        assert (await there.check_budget(LIMIT, reservation_id="call-1")).allowed
        held = await here.check_budget(1)
        assert (held.allowed, held.reserved_nano_usd) == (False, LIMIT)

        await here.record_usage(tool_usage("call-1", LIMIT // 4))
        seen = await there.check_budget(0)
        assert (seen.spent_today_nano_usd, seen.reserved_nano_usd) == (LIMIT // 4, 0)
        assert seen.remaining_nano_usd == LIMIT - LIMIT // 4
