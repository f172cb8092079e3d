"""Budgets: may a tenant spend more? Answered from memory, kept exact with the ledger.

A check comes before every model call, so it must be quick, and concurrent checks
must not all spend the same headroom. So this process keeps a view of each tenant
(its limits, what it spent on the UTC day and month, the estimates it holds for calls
checked but not yet recorded) and decides from it with no ``await`` between reading
the view and holding the estimate: on one event loop nothing runs in between.

Exact with the ledger: a tenant's view is loaded (sums) the first time the tenant is
needed, and every row this process inserts is added to it (a duplicate never is; a
row of another day or month counts only there). A load waits for the tenant's inserts
in flight and holds new ones back until it has its sums, so each row is counted once,
by the sums or by the addition; inserts run shielded, so a RecordUsage cancelled
midway still adds the row it wrote.

Reservations: an allowed check with an estimate > 0 and a reservation_id holds the
estimate until the RecordUsage with usage_id == reservation_id arrives (its real cost
replaces the hold) or ``reservation_seconds`` pass. A check repeated with the same
reservation_id is decided again without its own hold and keeps one hold, not two.

Replicas sharing a PostgreSQL ledger each keep their own view, reloaded when older
than ``refresh_seconds`` (and when the UTC day turns): that brings in rows and budget
changes made elsewhere, and drops holds whose calls were recorded at another replica.
Reservations are per replica: one replica does not see another's holds, so N replicas
may let N callers through on the same headroom, and spend recorded elsewhere counts
here only after the next reload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from trellis_costs.ledger import Budget, Ledger, Recorded, UsageEvent, utc_day, utc_now
from trellis_costs.ledger.base import Clock

T = TypeVar("T")

DEFAULT_RESERVATION_SECONDS = 60.0
DEFAULT_REFRESH_SECONDS = 5.0


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


@dataclass
class _View:
    """A tenant's limits and spend as of its last load, plus the rows added since."""

    budget: Budget
    day: str
    spent_today: int
    spent_month: int
    loaded_at: float

    def add(self, day: str, cost: int) -> None:
        if day == self.day:
            self.spent_today += cost
        if day[:7] == self.day[:7]:
            self.spent_month += cost

    def headroom(self, reserved: int) -> int | None:
        """Least of (limit - spent - reserved) over the limits set, floored at 0."""
        rooms = [
            max(0, limit - spent - reserved)
            for limit, spent in (
                (self.budget.daily_limit_nano_usd, self.spent_today),
                (self.budget.monthly_limit_nano_usd, self.spent_month),
            )
            if limit > 0
        ]
        return min(rooms) if rooms else None


@dataclass
class _Hold:
    amount: int
    expires_at: float


class _Tenant:
    """One tenant's view and holds, and the gate between its loads and its inserts."""

    def __init__(self) -> None:
        self.view: _View | None = None
        #: By reservation id, in order of expiry (every hold lives as long).
        self.holds: dict[str, _Hold] = {}
        self.reserved = 0
        #: The load under way: inserts wait for it, it waits for the inserts in flight.
        self.loading: asyncio.Task[None] | None = None
        self.inserting = 0
        self.drained = asyncio.Event()
        self.drained.set()

    def hold(self, reservation_id: str, amount: int, expires_at: float) -> None:
        held = self.holds.get(reservation_id)
        if held is None:
            self.holds[reservation_id] = _Hold(amount, expires_at)
        else:
            self.reserved -= held.amount
            held.amount = amount
        self.reserved += amount

    def release(self, reservation_id: str) -> None:
        held = self.holds.pop(reservation_id, None)
        if held is not None:
            self.reserved -= held.amount

    def expire(self, now: float) -> None:
        while self.holds:
            reservation_id, held = next(iter(self.holds.items()))
            if held.expires_at > now:
                return
            self.release(reservation_id)

    def begin_insert(self) -> None:
        self.inserting += 1
        self.drained.clear()

    def end_insert(self) -> None:
        self.inserting -= 1
        if self.inserting == 0:
            self.drained.set()


class Budgets:
    """Budget checks with reservations over a ledger; also the way rows are recorded,
    so that the view sees each one."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        reservation_seconds: float = DEFAULT_RESERVATION_SECONDS,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._reservation_seconds = reservation_seconds
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._tenants: dict[str, _Tenant] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def today(self) -> str:
        """Today's UTC day, ``YYYY-MM-DD``."""
        return utc_day(self._clock())

    async def record(self, event: UsageEvent) -> Recorded:
        """Write ``event`` to the ledger and count it (once) in the tenant's view;
        the hold of the call (reservation_id == usage_id) is released either way."""
        tenant = await self._fresh(event.tenant_id)
        while tenant.loading is not None:  # a reload began since: its sums come first
            await asyncio.shield(tenant.loading)
        tenant.begin_insert()
        return await self._shielded(self._insert(tenant, event))

    async def check(
        self, tenant_id: str, estimate_nano_usd: int = 0, reservation_id: str = ""
    ) -> BudgetCheck:
        """May ``tenant_id`` spend ``estimate_nano_usd`` more? Holds it when allowed.

        Without a limit: always allowed. With limits: allowed while there is headroom
        under every limit set and the estimate fits in it, so an estimate of 0 asks
        "is anything left at all?".
        """
        if estimate_nano_usd < 0:
            raise ValueError("the estimate must not be negative")
        tenant = await self._fresh(tenant_id)
        # From here to the return there is no await: the read and the hold are one step.
        view = tenant.view
        assert view is not None
        now = self._monotonic()
        tenant.expire(now)
        own = tenant.holds.get(reservation_id) if reservation_id else None
        reserved = tenant.reserved - (own.amount if own else 0)
        room = view.headroom(reserved)
        allowed = room is None or (room > 0 and estimate_nano_usd <= room)
        if reservation_id and allowed and estimate_nano_usd > 0:
            expires_at = own.expires_at if own else now + self._reservation_seconds
            tenant.hold(reservation_id, estimate_nano_usd, expires_at)
        elif own is not None:  # the latest check of a call decides its hold
            tenant.release(reservation_id)
        return BudgetCheck(
            allowed=allowed,
            daily_limit_nano_usd=view.budget.daily_limit_nano_usd,
            monthly_limit_nano_usd=view.budget.monthly_limit_nano_usd,
            spent_today_nano_usd=view.spent_today,
            spent_this_month_nano_usd=view.spent_month,
            reserved_nano_usd=reserved,
            remaining_nano_usd=room or 0,
            estimated_cost_nano_usd=estimate_nano_usd,
        )

    async def headroom(self, tenant_id: str) -> int | None:
        """What the tenant may still spend now, after every hold; None without a budget."""
        tenant = await self._fresh(tenant_id)
        assert tenant.view is not None
        tenant.expire(self._monotonic())
        return tenant.view.headroom(tenant.reserved)

    async def set_budget(self, budget: Budget) -> None:
        """Store ``budget`` (both limits 0 remove it) and use it here at once."""
        await self._ledger.set_budget(budget)
        tenant = self._tenants.get(budget.tenant_id)
        if tenant is None:
            return
        if tenant.loading is not None:  # it may have read the limits before this write
            await asyncio.wait([tenant.loading])
        if tenant.view is not None:
            tenant.view.budget = budget

    async def _fresh(self, tenant_id: str) -> _Tenant:
        """The tenant, its view loaded for today and no older than refresh_seconds."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            tenant = self._tenants[tenant_id] = _Tenant()
        if tenant.loading is None:
            if self._is_fresh(tenant.view):
                return tenant
            tenant.loading = self._spawn(self._load(tenant_id, tenant))
        # One load per tenant at a time, shared by every caller waiting for it.
        await asyncio.shield(tenant.loading)
        return tenant

    def _is_fresh(self, view: _View | None) -> bool:
        return (
            view is not None
            and view.day == self.today()
            and self._monotonic() - view.loaded_at < self._refresh_seconds
        )

    async def _load(self, tenant_id: str, tenant: _Tenant) -> None:
        try:
            await tenant.drained.wait()  # rows being written now are in the sums
            day = self.today()
            spending = await self._ledger.spending(tenant_id, day, list(tenant.holds))
            tenant.view = _View(
                spending.budget,
                day,
                spending.spent_today_nano_usd,
                spending.spent_this_month_nano_usd,
                self._monotonic(),
            )
            for reservation_id in spending.recorded:  # recorded at another replica
                tenant.release(reservation_id)
        finally:
            tenant.loading = None

    async def _insert(self, tenant: _Tenant, event: UsageEvent) -> Recorded:
        try:
            recorded = await self._ledger.record(event)
            if not recorded.duplicate and tenant.view is not None:
                tenant.view.add(recorded.day, recorded.cost_nano_usd)
            tenant.release(event.usage_id)
            return recorded
        finally:
            tenant.end_insert()

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task kept alive (and its failure retrieved) even if every waiter leaves."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a waiter that is still there gets it anyway

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to its end even if the caller is cancelled meanwhile."""
        return await asyncio.shield(self._spawn(coro))
