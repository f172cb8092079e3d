"""Budgets without gRPC, on a fake clock, over a real ledger (each backend): limits per
day and month, reservations, and replicas (two ledgers on one database) deciding from
the same spend and holds."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from trellis_costs.budgets import Budgets
from trellis_costs.ledger import Budget, Ledger, UsageEvent, UsageKind, open_ledger
from trellis_costs.prices import PriceTable

DAY = "2025-03-15"


class FakeClock:
    """Wall time (UTC days, hold expiry) that tests move."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def ledger(ledger_url: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    opened = await open_ledger(ledger_url, PriceTable.load(), clock=clock)
    yield opened
    await opened.close()


@pytest.fixture
async def other_ledger(ledger_url: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    """A second connection (pool) to the same database: another replica's."""
    opened = await open_ledger(ledger_url, PriceTable.load(), clock=clock)
    yield opened
    await opened.close()


def budgets_over(ledger: Ledger, clock: FakeClock, **kw: float) -> Budgets:
    kw.setdefault("reservation_seconds", 60.0)
    return Budgets(ledger, clock=clock, **kw)


@pytest.fixture
def budgets(ledger: Ledger, clock: FakeClock) -> Budgets:
    return budgets_over(ledger, clock)


def spend(usage_id: str, cost: int, *, tenant: str = "t1", when: datetime | None = None):
    return UsageEvent(
        usage_id, tenant, UsageKind.TOOL, tool="probe", tool_cost_nano_usd=cost, occurred_at=when
    )


async def test_without_a_budget_everything_is_allowed(budgets: Budgets) -> None:
    await budgets.record(spend("u1", 500))
    check = await budgets.check("t1", 10**15, reservation_id="r1")
    assert check.allowed
    assert (check.daily_limit_nano_usd, check.monthly_limit_nano_usd) == (0, 0)
    assert (check.spent_today_nano_usd, check.remaining_nano_usd) == (500, 0)
    assert await budgets.headroom("t1") is None


async def test_daily_limit_allows_what_fits_and_zero_asks_for_anything_left(
    budgets: Budgets,
) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    await budgets.record(spend("u1", 600))
    check = await budgets.check("t1", 400)
    assert (check.allowed, check.spent_today_nano_usd, check.remaining_nano_usd) == (
        True,
        600,
        400,
    )
    assert not (await budgets.check("t1", 401)).allowed
    assert (await budgets.check("t1", 0)).allowed
    await budgets.record(spend("u2", 400))
    exhausted = await budgets.check("t1", 0)
    assert (exhausted.allowed, exhausted.remaining_nano_usd) == (False, 0)
    assert (await budgets.check("other", 10**12)).allowed  # budgets are per tenant


async def test_a_check_counts_rows_written_before_and_elsewhere(
    ledger: Ledger, clock: FakeClock
) -> None:
    await ledger.record(spend("old", 700))  # straight into the ledger, not through Budgets
    await ledger.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    check = await budgets_over(ledger, clock).check("t1", 300)
    assert (check.allowed, check.spent_today_nano_usd, check.remaining_nano_usd) == (
        True,
        700,
        300,
    )


async def test_rows_of_other_days_and_months_count_there(
    budgets: Budgets, clock: FakeClock
) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=10**9, monthly_limit_nano_usd=10**9))
    await budgets.record(spend("today", 1))
    await budgets.record(spend("earlier", 10, when=datetime(2025, 3, 2, tzinfo=UTC)))
    await budgets.record(spend("february", 100, when=datetime(2025, 2, 28, tzinfo=UTC)))
    await budgets.record(spend("april", 1_000, when=datetime(2025, 4, 1, tzinfo=UTC)))
    check = await budgets.check("t1")
    assert (check.spent_today_nano_usd, check.spent_this_month_nano_usd) == (1, 11)


async def test_monthly_limit_binds_independently_of_the_daily_one(
    budgets: Budgets, clock: FakeClock
) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000, monthly_limit_nano_usd=1_500))
    await budgets.record(spend("u1", 900))
    clock.advance(24 * 3600)  # the 16th: a new day, the same month
    check = await budgets.check("t1", 600)
    assert (check.spent_today_nano_usd, check.spent_this_month_nano_usd) == (0, 900)
    # 1,000 left today but only 600 this month: the tighter limit decides.
    assert (check.allowed, check.remaining_nano_usd) == (True, 600)
    assert not (await budgets.check("t1", 601)).allowed
    await budgets.record(spend("u2", 600))
    assert not (await budgets.check("t1", 0)).allowed  # month spent, day not

    clock.now = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)
    check = await budgets.check("t1", 1_000)
    assert (check.allowed, check.spent_this_month_nano_usd) == (True, 0)


async def test_daily_limit_binds_while_the_month_has_room(
    budgets: Budgets, clock: FakeClock
) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=100, monthly_limit_nano_usd=10_000))
    await budgets.record(spend("u1", 100))
    check = await budgets.check("t1", 1)
    assert (check.allowed, check.remaining_nano_usd, check.spent_this_month_nano_usd) == (
        False,
        0,
        100,
    )
    clock.advance(24 * 3600)
    assert (await budgets.check("t1", 100)).allowed


async def test_a_hold_counts_until_its_usage_is_recorded(budgets: Budgets) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    first = await budgets.check("t1", 600, reservation_id="call-1")
    assert (first.allowed, first.reserved_nano_usd, first.remaining_nano_usd) == (True, 0, 1_000)
    second = await budgets.check("t1", 600, reservation_id="call-2")
    assert (second.allowed, second.reserved_nano_usd, second.remaining_nano_usd) == (
        False,
        600,
        400,
    )
    assert await budgets.headroom("t1") == 400

    await budgets.record(spend("call-1", 250))  # the real cost replaces the estimate
    after = await budgets.check("t1", 750, reservation_id="call-2")
    assert (after.allowed, after.spent_today_nano_usd, after.reserved_nano_usd) == (True, 250, 0)
    assert await budgets.headroom("t1") == 0


async def test_the_same_reservation_id_keeps_one_hold(budgets: Budgets) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    for _ in range(3):
        check = await budgets.check("t1", 400, reservation_id="call-1")
        assert (check.allowed, check.reserved_nano_usd) == (True, 0)
    assert await budgets.headroom("t1") == 600
    # Asked again with a larger estimate, the one hold grows; refused, it is let go.
    assert (await budgets.check("t1", 900, reservation_id="call-1")).allowed
    assert await budgets.headroom("t1") == 100
    assert not (await budgets.check("t1", 1_001, reservation_id="call-1")).allowed
    assert await budgets.headroom("t1") == 1_000


async def test_holds_need_an_id_and_a_positive_allowed_estimate(budgets: Budgets) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    await budgets.check("t1", 500)  # no reservation id
    await budgets.check("t1", 0, reservation_id="zero")
    await budgets.check("t1", 2_000, reservation_id="refused")
    assert await budgets.headroom("t1") == 1_000


async def test_expired_holds_are_released(budgets: Budgets, clock: FakeClock) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    assert (await budgets.check("t1", 1_000, reservation_id="never-recorded")).allowed
    clock.advance(59.9)
    assert not (await budgets.check("t1", 1)).allowed
    clock.advance(0.1)
    check = await budgets.check("t1", 1_000)
    assert (check.allowed, check.reserved_nano_usd) == (True, 0)


async def test_a_duplicate_record_is_not_counted_twice(budgets: Budgets, ledger: Ledger) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    assert (await budgets.check("t1", 300, reservation_id="u1")).allowed
    first = await budgets.record(spend("u1", 300))
    again = await budgets.record(spend("u1", 300))
    assert (first.duplicate, again.duplicate) == (False, True)
    check = await budgets.check("t1")
    assert (check.spent_today_nano_usd, check.reserved_nano_usd) == (300, 0)


async def test_replicas_see_each_others_spend_holds_and_budgets_at_once(
    ledger: Ledger, other_ledger: Ledger, clock: FakeClock
) -> None:
    here, there = budgets_over(ledger, clock), budgets_over(other_ledger, clock)
    await here.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    assert (await there.check("t1", 700, reservation_id="call-1")).allowed
    held = await here.check("t1", 400, reservation_id="call-2")
    assert (held.allowed, held.reserved_nano_usd, held.remaining_nano_usd) == (False, 700, 300)

    await here.record(spend("call-1", 800))  # recorded here, held there: the hold ends
    seen = await there.check("t1", 0)
    assert (seen.spent_today_nano_usd, seen.reserved_nano_usd) == (800, 0)
    await here.set_budget(Budget("t1", daily_limit_nano_usd=2_000))
    raised = await there.check("t1", 1_200, reservation_id="call-2")
    assert (raised.allowed, raised.daily_limit_nano_usd, raised.remaining_nano_usd) == (
        True,
        2_000,
        1_200,
    )


async def test_without_a_budget_nothing_is_held(budgets: Budgets) -> None:
    assert (await budgets.check("t1", 500, reservation_id="r1")).hold_nano_usd == 0
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    assert await budgets.headroom("t1") == 1_000


async def test_set_budget_keeps_the_limits_it_is_not_given(budgets: Budgets) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=100, monthly_limit_nano_usd=1_000))
    stored = await budgets.set_budget(
        Budget("t1", monthly_limit_nano_usd=2_000), ["monthly_limit_nano_usd"]
    )
    assert stored == Budget("t1", 100, 2_000)
    check = await budgets.check("t1")
    assert (check.daily_limit_nano_usd, check.monthly_limit_nano_usd) == (100, 2_000)


async def test_set_budget_applies_at_once_and_zero_limits_remove_it(budgets: Budgets) -> None:
    await budgets.record(spend("u1", 100))
    assert await budgets.headroom("t1") is None
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=150))
    assert await budgets.headroom("t1") == 50
    await budgets.set_budget(Budget("t1"))
    assert await budgets.headroom("t1") is None
    assert (await budgets.check("t1", 10**12)).allowed


async def test_negative_estimate_is_refused(budgets: Budgets) -> None:
    with pytest.raises(ValueError):
        await budgets.check("t1", -1)


@pytest.mark.parametrize("seed", range(3))
async def test_concurrent_checks_on_two_replicas_spend_each_headroom_once(
    ledger: Ledger, other_ledger: Ledger, clock: FakeClock, seed: int
) -> None:
    """50 callers over two replicas (two connections), in a random order: exactly what
    fits is allowed, and the ledger ends at the limit with no hold left."""
    replicas = [budgets_over(ledger, clock), budgets_over(other_ledger, clock)]
    await replicas[0].set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    pick = random.Random(seed)

    async def caller(i: int) -> bool:
        budgets = replicas[i % 2]
        await asyncio.sleep(pick.random() / 50)
        check = await budgets.check("t1", 30, reservation_id=f"u{i}")
        await asyncio.sleep(pick.random() / 50)
        if check.allowed:
            await replicas[pick.randrange(2)].record(spend(f"u{i}", 30))
        return check.allowed

    allowed = sum(await asyncio.gather(*(caller(i) for i in range(50))))
    assert allowed == 1_000 // 30
    after = await replicas[1].check("t1")
    assert (after.spent_today_nano_usd, after.reserved_nano_usd) == (allowed * 30, 0)


async def test_a_cancelled_record_counts_once_when_retried(budgets: Budgets) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=10**9))
    assert (await budgets.check("t1", 50, reservation_id="u1")).allowed
    task = asyncio.ensure_future(budgets.record(spend("u1", 42)))
    for _ in range(3):
        await asyncio.sleep(0)  # into the insert
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await budgets.record(spend("u1", 42))  # the caller's retry
    check = await budgets.check("t1")
    assert (check.spent_today_nano_usd, check.reserved_nano_usd) == (42, 0)
