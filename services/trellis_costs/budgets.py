"""Budgets: may a tenant spend more? Decided in the shared ledger, so every replica agrees.

A check is one ledger transaction (``Ledger.decide_and_hold``): with the tenant's budget
locked, it reads the limits, the spend of the UTC day and month (running totals the
ledger keeps in each insert's transaction, so spend recorded at any replica counts at
once) and the estimates other calls hold, decides with ``decide`` below and writes this
call's hold. Checks of one tenant serialize on every replica, so concurrent callers
cannot spend the same headroom twice, however many replicas answer them: N replicas
together overshoot a budget by at most one call's estimate (a call costing more than
its estimate, or an estimate of 0 let through while anything was left).

Reservations: an allowed check with an estimate > 0 and a reservation_id, for a tenant
with a budget, holds the estimate until the RecordUsage with usage_id ==
reservation_id (the ledger ends the hold in the insert's transaction, and the real
cost counts instead) or ``reservation_seconds`` pass (expired holds are ignored, and
deleted by the tenant's next check). A check repeated with the same reservation_id is
decided again without its own hold and keeps one hold, with its first expiry; refused,
it lets the hold go. Expiry is on the replicas' wall clocks, which need to agree to
well within ``reservation_seconds``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta

from trellis.runtime.errors import AlreadyExists
from trellis_costs.ledger import (
    BUDGET_LIMITS,
    Budget,
    Ledger,
    Recorded,
    Standing,
    UsageEvent,
    utc_day,
    utc_now,
)
from trellis_costs.ledger.base import Clock

DEFAULT_RESERVATION_SECONDS = 60.0


@dataclass(frozen=True)
class BudgetCheck:
    """A decision and the figures it weighed (zero limits: no budget is set)."""

    allowed: bool
    daily_limit_nano_usd: int
    monthly_limit_nano_usd: int
    spent_today_nano_usd: int
    spent_this_month_nano_usd: int
    #: Estimates held for other calls when this one was decided.
    reserved_nano_usd: int
    #: Least headroom under the limits set, after those holds; 0 when none is set.
    remaining_nano_usd: int
    estimated_cost_nano_usd: int
    #: What this check holds under its reservation (0: nothing, or its hold let go).
    hold_nano_usd: int = 0

    @property
    def headroom_after(self) -> int | None:
        """What is left once this check's hold is taken too; None without a budget."""
        if not (self.daily_limit_nano_usd or self.monthly_limit_nano_usd):
            return None
        return self.remaining_nano_usd - self.hold_nano_usd


def headroom(standing: Standing) -> int | None:
    """Least of (limit - spent - reserved) over the limits set, floored at 0; None
    without a limit."""
    budget = standing.budget
    rooms = [
        max(0, limit - spent - standing.reserved_nano_usd)
        for limit, spent in (
            (budget.daily_limit_nano_usd, standing.spent_today_nano_usd),
            (budget.monthly_limit_nano_usd, standing.spent_this_month_nano_usd),
        )
        if limit > 0
    ]
    return min(rooms) if rooms else None


def decide(standing: Standing, estimate_nano_usd: int, reservation_id: str) -> BudgetCheck:
    """Allowed without a limit; with limits, while there is headroom under every limit
    set and the estimate fits in it, so an estimate of 0 asks "is anything left at all?".
    """
    room = headroom(standing)
    allowed = room is None or (room > 0 and estimate_nano_usd <= room)
    hold = estimate_nano_usd if reservation_id and allowed and room is not None else 0
    budget = standing.budget
    return BudgetCheck(
        allowed=allowed,
        daily_limit_nano_usd=budget.daily_limit_nano_usd,
        monthly_limit_nano_usd=budget.monthly_limit_nano_usd,
        spent_today_nano_usd=standing.spent_today_nano_usd,
        spent_this_month_nano_usd=standing.spent_this_month_nano_usd,
        reserved_nano_usd=standing.reserved_nano_usd,
        remaining_nano_usd=room or 0,
        estimated_cost_nano_usd=estimate_nano_usd,
        hold_nano_usd=hold,
    )


class Budgets:
    """Budget checks with reservations, and the recording that settles them, over a
    ledger every replica shares."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        reservation_seconds: float = DEFAULT_RESERVATION_SECONDS,
        clock: Clock = utc_now,
    ) -> None:
        self._ledger = ledger
        self._reservation = timedelta(seconds=reservation_seconds)
        self._clock = clock

    def today(self) -> str:
        """Today's UTC day, ``YYYY-MM-DD``."""
        return utc_day(self._clock())

    async def record(self, event: UsageEvent) -> Recorded:
        """Write ``event`` to the ledger (once); the hold of the call (reservation_id ==
        usage_id) ends in the same transaction."""
        return await self._ledger.record(event)

    async def record_many(self, events: Sequence[UsageEvent]) -> list[Recorded | AlreadyExists]:
        """``record`` of a batch in one ledger transaction; a result per event."""
        return await self._ledger.record_many(events)

    async def check(
        self, tenant_id: str, estimate_nano_usd: int = 0, reservation_id: str = ""
    ) -> BudgetCheck:
        """May ``tenant_id`` spend ``estimate_nano_usd`` more? Holds it when allowed
        (see ``decide``); without a reservation_id nothing is written."""
        if estimate_nano_usd < 0:
            raise ValueError("the estimate must not be negative")
        now = self._clock()
        day = utc_day(now)
        if not reservation_id:
            return decide(await self._ledger.standing(tenant_id, day, now), estimate_nano_usd, "")
        return await self._ledger.decide_and_hold(
            tenant_id,
            day,
            now,
            reservation_id,
            now + self._reservation,
            lambda standing: decide(standing, estimate_nano_usd, reservation_id),
        )

    async def headroom(self, tenant_id: str) -> int | None:
        """What the tenant may still spend now, after every hold; None without a budget."""
        now = self._clock()
        return headroom(await self._ledger.standing(tenant_id, utc_day(now), now))

    async def headrooms(self) -> dict[str, int]:
        """``headroom`` of every tenant that has a budget."""
        now = self._clock()
        standings = await self._ledger.standings(utc_day(now), now)
        return {s.budget.tenant_id: headroom(s) or 0 for s in standings}

    async def set_budget(self, budget: Budget, limits: Collection[str] = BUDGET_LIMITS) -> Budget:
        """Store the ``limits`` of ``budget`` (the others keep their value; both 0 remove
        the budget); every later check uses it. Returns the budget now stored."""
        return await self._ledger.set_budget(budget, limits)
