"""What cost accounting needs from a ledger, whichever database holds it.

Contract shared by every backend (and checked by one set of tests against each):
one row per usage event, keyed by the caller's ``usage_id`` so a retried or resumed
call is counted once: the insert is ``ON CONFLICT DO NOTHING`` and a repeat gets the
stored cost back, ``duplicate=True``; a usage_id of another tenant is
AlreadyExists(reason="USAGE_ID_TAKEN"). Costs are computed once, at insert time,
with the prices then in force, and stored as integer nano-USD; reports and budgets
only sum them. A row's day is the UTC day of its ``occurred_at``, ``YYYY-MM-DD``.
Every write is committed when its method returns.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Protocol

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


@dataclass(frozen=True)
class UsageReport:
    rows: list[UsageRow] = field(default_factory=list)
    total_cost_nano_usd: int = 0


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
class Spending:
    """What a budget view loads: a tenant's limits and spend on a day and its month."""

    budget: Budget
    spent_today_nano_usd: int
    spent_this_month_nano_usd: int
    #: Those of the asked usage ids that are in the ledger (their calls were recorded).
    recorded: frozenset[str] = frozenset()


class Ledger(Protocol):
    async def close(self) -> None: ...

    async def record(self, event: UsageEvent) -> Recorded:
        """Store ``event`` once; a repeated usage_id returns the stored cost, uncounted.
        AlreadyExists(reason="USAGE_ID_TAKEN") when another tenant used the id."""
        ...

    async def usage(self, tenant_id: str, start_day: str, end_day: str) -> UsageReport:
        """Totals by day, kind and model-or-tool over the inclusive window of days."""
        ...

    async def set_budget(self, budget: Budget) -> None:
        """Set a tenant's limits; both limits 0 removes its budget."""
        ...

    async def get_budget(self, tenant_id: str) -> Budget | None: ...

    async def spending(self, tenant_id: str, day: str, usage_ids: Collection[str] = ()) -> Spending:
        """The tenant's budget and what it spent on ``day`` and in its whole month.

        ``usage_ids`` found in the ledger come back in ``recorded``; they are looked up
        before the sums, so a call found recorded is in them.
        """
        ...


def price(prices: PriceTable, event: UsageEvent) -> tuple[int, bool]:
    """(cost, known) of ``event``: a tool's declared cost, or the model's tokens priced."""
    if event.kind is UsageKind.TOOL:
        return event.tool_cost_nano_usd, True
    return prices.cost_nano_usd(
        event.model, event.input_tokens, event.output_tokens, event.cached_input_tokens
    )


def check_limits(budget: Budget) -> None:
    if budget.daily_limit_nano_usd < 0 or budget.monthly_limit_nano_usd < 0:
        raise ValueError("budget limits must not be negative")


def usage_id_taken(usage_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"usage_id {usage_id!r} is already used by another tenant", reason="USAGE_ID_TAKEN"
    )


def report(rows: list[UsageRow]) -> UsageReport:
    return UsageReport(rows, sum(row.cost_nano_usd for row in rows))
