"""Budgets without gRPC, on a fake clock, over a real ledger (each backend): limits per
day and month, the in-memory view kept exact with the ledger, reservations, reloads."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from trellis_costs.budgets import Budgets
from trellis_costs.ledger import Budget, Ledger, UsageEvent, UsageKind, open_ledger
from trellis_costs.prices import PriceTable


class FakeClock:
    """Wall time (UTC days) and monotonic time (holds, reload ages) that tests move."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
        self.seconds = 1_000.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.seconds += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def ledger(ledger_url: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    opened = await open_ledger(ledger_url, PriceTable.load(), clock=clock)
    yield opened
    await opened.close()


def budgets_over(ledger: Ledger, clock: FakeClock, **kw: float) -> Budgets:
    kw.setdefault("reservation_seconds", 60.0)
    kw.setdefault("refresh_seconds", 5.0)
    return Budgets(ledger, clock=clock, monotonic=clock.monotonic, **kw)


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


async def test_the_view_is_loaded_from_rows_written_before(
    ledger: Ledger, clock: FakeClock
) -> None:
    await ledger.record(spend("old", 700))  # before this process had a view
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
    await budgets.check("t1")  # the view is loaded: what follows is added to it
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
    assert (await ledger.spending("t1", "2025-03-15")).spent_today_nano_usd == 300


async def test_a_replica_sees_others_spend_and_budget_after_its_refresh(
    ledger: Ledger, clock: FakeClock
) -> None:
    here, there = budgets_over(ledger, clock), budgets_over(ledger, clock)
    await here.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    assert (await there.check("t1", 1_000, reservation_id="call-1")).allowed
    await here.record(spend("call-1", 800))  # recorded at the other replica
    await here.set_budget(Budget("t1", daily_limit_nano_usd=2_000))

    stale = await there.check("t1", 0)
    assert (stale.daily_limit_nano_usd, stale.spent_today_nano_usd) == (1_000, 0)
    assert stale.reserved_nano_usd == 1_000
    clock.advance(5)
    fresh = await there.check("t1", 0)
    assert (fresh.daily_limit_nano_usd, fresh.spent_today_nano_usd) == (2_000, 800)
    assert fresh.reserved_nano_usd == 0  # the hold went when its call showed up recorded


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


class Jittery:
    """The real ledger with random pauses before and after each call, so that loads and
    inserts of one tenant overlap, and return, in every order."""

    def __init__(self, ledger: Ledger, seed: int) -> None:
        self._ledger = ledger
        self._random = random.Random(seed)

    def __getattr__(self, name: str):
        method = getattr(self._ledger, name)

        async def call(*args, **kwargs):
            await asyncio.sleep(self._random.random() / 500)
            result = await method(*args, **kwargs)
            await asyncio.sleep(self._random.random() / 500)
            return result

        return call


@pytest.mark.parametrize("seed", range(5))
async def test_reloads_racing_inserts_keep_the_view_exact(
    ledger: Ledger, clock: FakeClock, seed: int
) -> None:
    budgets = budgets_over(Jittery(ledger, seed), clock, refresh_seconds=1)  # type: ignore[arg-type]
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=10**12))
    pick = random.Random(seed)

    def stale() -> None:
        if pick.random() < 0.5:
            clock.seconds += 1  # the view is stale: the next call reloads it

    async def one(i: int) -> None:
        await asyncio.sleep(pick.random() / 20)  # callers come and go over 50 ms
        await budgets.check("t1", i, reservation_id=f"u{i}")
        stale()
        await budgets.record(spend(f"u{i}", i))
        stale()
        await budgets.record(spend(f"u{i}", i))  # a retry: no double count

    await asyncio.gather(*(one(i) for i in range(1, 101)))
    truth = (await ledger.spending("t1", "2025-03-15")).spent_today_nano_usd
    assert truth == sum(range(1, 101))
    # The clock stands still now, so this reads the view as the races left it.
    check = await budgets.check("t1")
    assert (check.spent_today_nano_usd, check.reserved_nano_usd) == (truth, 0)


async def test_a_cancelled_record_still_counts_its_row(budgets: Budgets, ledger: Ledger) -> None:
    await budgets.set_budget(Budget("t1", daily_limit_nano_usd=10**9))
    await budgets.check("t1")
    task = asyncio.ensure_future(budgets.record(spend("u1", 42)))
    for _ in range(3):
        await asyncio.sleep(0)  # into the insert
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the insert goes on without its caller
        if (await budgets.check("t1")).spent_today_nano_usd == 42:
            break
        await asyncio.sleep(0.01)
    assert (await budgets.check("t1")).spent_today_nano_usd == 42
    assert (await ledger.spending("t1", "2025-03-15")).spent_today_nano_usd == 42
