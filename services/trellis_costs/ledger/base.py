"""What cost accounting needs from a ledger, whichever database holds it.

Contract shared by every backend (and checked by one set of tests against each):
one row per usage event, keyed by the caller's ``usage_id`` so a retried or resumed
call is counted once: the insert is ``ON CONFLICT DO NOTHING`` and a repeat gets the
stored cost back, ``duplicate=True``; a usage_id of another tenant is
AlreadyExists(reason="USAGE_ID_TAKEN"). Costs are computed once, at insert time,
with the prices then in force, and stored as integer nano-USD; reports and budgets
only sum them. A row's day is the UTC day of its ``occurred_at``, ``YYYY-MM-DD``.
Every write is committed when its method returns; ``record_many`` writes a batch of
events in one transaction, so a batch costs one commit.

Budgets live in the same database, so every replica decides from the same figures:
``spend_by_day`` is a running total per tenant and day that an insert trigger keeps in
the insert's own transaction (whoever inserts: any replica, any version), so a check
sums at most 31 rows however many events a month holds; ``budget_holds`` are the
estimates allowed checks hold until their usage is recorded. A check
(``decide_and_hold``) locks the tenant's budget row, reads spend and holds in one
statement (one snapshot: a recording that settles a hold is seen whole or not at all),
lets the caller decide and writes the hold, all in one transaction, so checks of one
tenant serialize across replicas. Recording a usage_id deletes the hold of that
reservation in the insert's transaction.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Protocol, TypeVar

from trellis.runtime.errors import AlreadyExists
from trellis_costs.prices import PriceTable

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

Clock = Callable[[], datetime]


def parse_day(text: str) -> str:
    """``text`` if it is a real ``YYYY-MM-DD`` day, else ValueError.

    Stricter than ``date.fromisoformat``, which since 3.11 also takes ``20240105``
    and week dates; stored days must compare as text.
    """
    if not _DAY.fullmatch(text):
        raise ValueError("must be a day as YYYY-MM-DD")
    date.fromisoformat(text)  # rejects 2024-02-30
    return text


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive datetime is taken as UTC already."""
    return (when.replace(tzinfo=UTC) if when.tzinfo is None else when).astimezone(UTC)


def utc_day(when: datetime) -> str:
    """The UTC day of ``when``, ``YYYY-MM-DD``."""
    return as_utc(when).date().isoformat()


def month_of(day: str) -> tuple[str, str]:
    """The first and last day of ``day``'s month (a budget month is a UTC calendar month)."""
    first = date.fromisoformat(day).replace(day=1)
    last = first.replace(day=calendar.monthrange(first.year, first.month)[1])
    return first.isoformat(), last.isoformat()


class UsageKind(StrEnum):
    MODEL = "model"
    TOOL = "tool"


@dataclass(frozen=True)
class UsageEvent:
    """One model call (priced here from tokens) or tool call (priced by the tool)."""

    usage_id: str
    tenant_id: str
    kind: UsageKind
    run_id: str = ""
    node_id: str = ""
    model: str = ""
    tool: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    tool_cost_nano_usd: int = 0
    estimated: bool = False
    #: When it happened; None means now. Naive datetimes are taken as UTC.
    occurred_at: datetime | None = None
    #: The session of the run (empty: none): GetUsage filters by it.
    session_id: str = ""

    @property
    def name(self) -> str:
        """What a report groups it under: the model, or the tool."""
        return self.tool if self.kind is UsageKind.TOOL else self.model


@dataclass(frozen=True)
class Recorded:
    cost_nano_usd: int
    #: The usage_id was recorded before; nothing was counted this time.
    duplicate: bool
    #: The UTC day the stored row counts in (the first recording's, for a duplicate).
    day: str
    #: False when a model had no price (cost 0); always True for tools and duplicates.
    price_known: bool = True


@dataclass(frozen=True)
class UsageRow:
    """Totals of one tenant, day and model (or tool)."""

    tenant_id: str
    day: str
    kind: UsageKind
    name: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_nano_usd: int
    events: int
    #: Events whose tokens were estimated (a cut stream), and the tokens they hold.
    estimated_events: int = 0
    estimated_input_tokens: int = 0
    estimated_output_tokens: int = 0


@dataclass(frozen=True)
class UsageReport:
    rows: list[UsageRow]
    total_cost_nano_usd: int
    total_input_tokens: int
    total_output_tokens: int
    estimated_events: int


@dataclass(frozen=True)
class RunUsage:
    """What the ledger holds for one run: its model calls, its tool calls, their ids."""

    #: The model of the run's model rows (the latest one when it used several).
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    model_cost_nano_usd: int = 0
    #: Some model row's tokens are estimated.
    estimated: bool = False
    tool_cost_nano_usd: int = 0
    usage_ids: tuple[str, ...] = ()

    @property
    def cost_nano_usd(self) -> int:
        return self.model_cost_nano_usd + self.tool_cost_nano_usd


#: The limits of a budget, by their field names (also SetBudget's update_mask paths).
BUDGET_LIMITS = ("daily_limit_nano_usd", "monthly_limit_nano_usd")


@dataclass(frozen=True)
class Budget:
    """Spending limits of a tenant; 0 means no limit of that kind."""

    tenant_id: str
    daily_limit_nano_usd: int = 0
    monthly_limit_nano_usd: int = 0

    @property
    def limited(self) -> bool:
        return self.daily_limit_nano_usd > 0 or self.monthly_limit_nano_usd > 0


@dataclass(frozen=True)
class Standing:
    """A tenant's budget figures on a day, read in one snapshot."""

    budget: Budget
    spent_today_nano_usd: int
    spent_this_month_nano_usd: int
    #: Unexpired holds of every reservation but the one asked about.
    reserved_nano_usd: int
    #: The unexpired hold of the reservation asked about (0: none).
    held_nano_usd: int = 0


def standing_of(
    tenant_id: str,
    daily: int | None,
    monthly: int | None,
    today: int | None,
    month: int | None,
    reserved: int | None,
    held: int | None = 0,
) -> Standing:
    """A Standing from the figures SQL gives (NULL: no budget, no spend, no hold)."""
    return Standing(
        Budget(tenant_id, int(daily or 0), int(monthly or 0)),
        spent_today_nano_usd=int(today or 0),
        spent_this_month_nano_usd=int(month or 0),
        reserved_nano_usd=int(reserved or 0),
        held_nano_usd=int(held or 0),
    )


class Decision(Protocol):
    """What a budget check decided, as far as the ledger must act on it."""

    @property
    def hold_nano_usd(self) -> int:
        """The estimate to hold under the reservation; 0 releases its hold."""
        ...


D = TypeVar("D", bound=Decision)


class Ledger(Protocol):
    async def close(self) -> None: ...

    async def record(self, event: UsageEvent) -> Recorded:
        """Store ``event`` once; a repeated usage_id returns the stored cost, uncounted.
        AlreadyExists(reason="USAGE_ID_TAKEN") when another tenant used the id. The
        tenant's hold whose reservation id is the usage_id goes in the same transaction."""
        ...

    async def record_many(self, events: Sequence[UsageEvent]) -> list[Recorded | AlreadyExists]:
        """``record`` of every event in ONE transaction (one commit for the batch); a
        result per event, in order: an id another tenant used is its AlreadyExists
        (returned, not raised: the other events are stored), a usage_id repeated in the
        batch is a duplicate of its first entry."""
        ...

    async def usage(
        self, tenant_id: str, start_day: str, end_day: str, session_id: str = ""
    ) -> UsageReport:
        """Totals by day, kind and model-or-tool over the inclusive window of days (only
        the rows of ``session_id`` when given)."""
        ...

    async def run_usage(self, tenant_id: str, run_id: str) -> RunUsage:
        """What the tenant's rows of ``run_id`` add up to (empty for another tenant's run)."""
        ...

    async def set_budget(self, budget: Budget, limits: Collection[str] = BUDGET_LIMITS) -> Budget:
        """Write the ``limits`` (of BUDGET_LIMITS) of ``budget``, keeping the others as
        stored; return the budget now stored. Both limits 0 remove the budget."""
        ...

    async def get_budget(self, tenant_id: str) -> Budget | None: ...

    async def standing(
        self, tenant_id: str, day: str, now: datetime, reservation_id: str = ""
    ) -> Standing:
        """The tenant's limits, spend on ``day`` and its month, and holds unexpired at
        ``now``, in one snapshot (no lock: for reports and gauges)."""
        ...

    async def standings(self, day: str, now: datetime) -> list[Standing]:
        """``standing`` of every tenant that has a budget, in one snapshot."""
        ...

    async def decide_and_hold(
        self,
        tenant_id: str,
        day: str,
        now: datetime,
        reservation_id: str,
        expires_at: datetime,
        decide: Callable[[Standing], D],
    ) -> D:
        """One budget check, atomic across replicas: with the tenant's budget locked,
        drop its expired holds, read its ``standing``, ``decide``, and hold the
        decision's ``hold_nano_usd`` under ``reservation_id`` (an unexpired hold keeps
        its expiry, a new one gets ``expires_at``; 0 releases it) before committing."""
        ...


def price(prices: PriceTable, event: UsageEvent) -> tuple[int, bool]:
    """(cost, known) of ``event``: a tool's declared cost, or the model's tokens priced."""
    if event.kind is UsageKind.TOOL:
        return event.tool_cost_nano_usd, True
    return prices.cost_nano_usd(
        event.model, event.input_tokens, event.output_tokens, event.cached_input_tokens
    )


def check_limits(budget: Budget, limits: Collection[str]) -> None:
    unknown = set(limits) - set(BUDGET_LIMITS)
    if unknown:
        raise ValueError(f"not a budget limit: {', '.join(sorted(unknown))}")
    if any(getattr(budget, name) < 0 for name in limits):
        raise ValueError("budget limits must not be negative")


def usage_id_taken(usage_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"usage_id {usage_id!r} is already used by another tenant", reason="USAGE_ID_TAKEN"
    )


def report(rows: list[UsageRow]) -> UsageReport:
    return UsageReport(
        rows,
        total_cost_nano_usd=sum(row.cost_nano_usd for row in rows),
        total_input_tokens=sum(row.input_tokens for row in rows),
        total_output_tokens=sum(row.output_tokens for row in rows),
        estimated_events=sum(row.estimated_events for row in rows),
    )


#: The columns ``run_usage`` adds up, in this order, oldest row first.
RUN_COLUMNS = (
    "usage_id, kind, model, input_tokens, output_tokens, cached_input_tokens,"
    " cost_nano_usd, estimated"
)


def run_usage(rows: Iterable[tuple[str, str, str, int, int, int, int, bool]]) -> RunUsage:
    """The totals of a run's rows (RUN_COLUMNS, oldest first)."""
    usage_ids: list[str] = []
    model, model_cost, tool_cost, estimated = "", 0, 0, False
    input_tokens = output_tokens = cached_input_tokens = 0
    for usage_id, kind, name, tokens_in, tokens_out, cached, cost, guessed in rows:
        usage_ids.append(usage_id)
        if kind == UsageKind.TOOL:
            tool_cost += cost
            continue
        model = name  # oldest first: the latest model row's model stays
        input_tokens += tokens_in
        output_tokens += tokens_out
        cached_input_tokens += cached
        model_cost += cost
        estimated = estimated or bool(guessed)
    return RunUsage(
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached_input_tokens,
        model_cost_nano_usd=model_cost,
        estimated=estimated,
        tool_cost_nano_usd=tool_cost,
        usage_ids=tuple(usage_ids),
    )
