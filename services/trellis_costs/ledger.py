"""The usage ledger and budgets, in SQLite (the embedded default store).

One row per usage event, keyed by the caller's ``usage_id`` so a retried or resumed
call is counted once: the insert is ``ON CONFLICT DO NOTHING`` and a repeat gets the
stored cost back. Costs are computed once, at insert time, with the prices then in
force, and stored as integer nano-USD; reports and budgets only sum them. Days are
UTC ``YYYY-MM-DD`` strings so that reports group and compare as text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum

import aiosqlite

from trellis.runtime.errors import AlreadyExists
from trellis.runtime.sqlite import connect
from trellis_costs.prices import PriceTable

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    usage_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    run_id TEXT NOT NULL DEFAULT '',
    node_id TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL CHECK (kind IN ('model', 'tool')),
    model TEXT NOT NULL DEFAULT '',
    tool TEXT NOT NULL DEFAULT '',
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    cost_nano_usd INTEGER NOT NULL,
    estimated INTEGER NOT NULL DEFAULT 0,
    occurred_at TEXT NOT NULL,
    day TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_tenant_day ON usage (tenant_id, day);
CREATE TABLE IF NOT EXISTS budgets (
    tenant_id TEXT PRIMARY KEY,
    daily_limit_nano_usd INTEGER NOT NULL DEFAULT 0,
    monthly_limit_nano_usd INTEGER NOT NULL DEFAULT 0
);
"""

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


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


@dataclass(frozen=True)
class BudgetCheck:
    allowed: bool
    daily_limit_nano_usd: int
    monthly_limit_nano_usd: int
    spent_today_nano_usd: int
    spent_this_month_nano_usd: int
    #: Least headroom left under the limits that are set (0 when none is set).
    remaining_nano_usd: int


class Ledger:
    """Usage rows and budgets over one SQLite connection."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        prices: PriceTable,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._db = db
        self._prices = prices
        self._clock = clock

    @classmethod
    async def open(
        cls, url: str, prices: PriceTable, *, clock: Callable[[], datetime] = utc_now
    ) -> Ledger:
        """Connect to ``url`` and create the tables if they are missing."""
        db = await connect(url)
        try:
            await db.executescript(SCHEMA)
            await db.commit()
        except BaseException:
            await db.close()
            raise
        return cls(db, prices, clock=clock)

    async def aclose(self) -> None:
        await self._db.close()

    def today(self) -> str:
        """Today's UTC day, ``YYYY-MM-DD``."""
        return self._clock().astimezone(UTC).date().isoformat()

    def _cost(self, event: UsageEvent) -> tuple[int, bool]:
        if event.kind is UsageKind.TOOL:
            return event.tool_cost_nano_usd, True
        return self._prices.cost_nano_usd(
            event.model, event.input_tokens, event.output_tokens, event.cached_input_tokens
        )

    async def record(self, event: UsageEvent) -> Recorded:
        """Store ``event`` once; a repeated usage_id returns the stored cost, uncounted.

        A usage_id already used by another tenant is ``AlreadyExists``: ids are global,
        and one tenant must not learn or overwrite another's usage.
        """
        cost, known = self._cost(event)
        when = event.occurred_at or self._clock()
        when = (when.replace(tzinfo=UTC) if when.tzinfo is None else when).astimezone(UTC)
        cursor = await self._db.execute(
            "INSERT INTO usage (usage_id, tenant_id, run_id, node_id, kind, model, tool,"
            " input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, estimated,"
            " occurred_at, day) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (usage_id) DO NOTHING",
            (
                event.usage_id,
                event.tenant_id,
                event.run_id,
                event.node_id,
                event.kind.value,
                event.model,
                event.tool,
                event.input_tokens,
                event.output_tokens,
                event.cached_input_tokens,
                cost,
                int(event.estimated),
                when.isoformat(),
                when.date().isoformat(),
            ),
        )
        inserted = cursor.rowcount == 1
        await cursor.close()
        await self._db.commit()
        if inserted:
            return Recorded(cost, duplicate=False, price_known=known)
        async with self._db.execute(
            "SELECT tenant_id, cost_nano_usd FROM usage WHERE usage_id = ?", (event.usage_id,)
        ) as rows:
            tenant_id, stored_cost = await rows.fetchone()  # type: ignore[misc]
        if tenant_id != event.tenant_id:
            raise AlreadyExists(
                f"usage_id {event.usage_id!r} is already used by another tenant",
                reason="USAGE_ID_TAKEN",
            )
        return Recorded(int(stored_cost), duplicate=True)

    async def usage(self, tenant_id: str, start_day: str, end_day: str) -> UsageReport:
        """Totals by day and model-or-tool over the inclusive window of days."""
        async with self._db.execute(
            "SELECT day, kind, CASE kind WHEN 'tool' THEN tool ELSE model END AS name,"
            " SUM(input_tokens), SUM(output_tokens), SUM(cached_input_tokens),"
            " SUM(cost_nano_usd), COUNT(*)"
            " FROM usage WHERE tenant_id = ? AND day BETWEEN ? AND ?"
            " GROUP BY day, kind, name ORDER BY day, kind, name",
            (tenant_id, start_day, end_day),
        ) as cursor:
            rows = [
                UsageRow(tenant_id, day, UsageKind(kind), name, *map(int, sums))
                for day, kind, name, *sums in await cursor.fetchall()
            ]
        return UsageReport(rows, sum(row.cost_nano_usd for row in rows))

    async def set_budget(self, budget: Budget) -> None:
        """Set a tenant's limits; both limits 0 removes its budget."""
        if budget.daily_limit_nano_usd < 0 or budget.monthly_limit_nano_usd < 0:
            raise ValueError("budget limits must not be negative")
        if budget.daily_limit_nano_usd == budget.monthly_limit_nano_usd == 0:
            await self._db.execute("DELETE FROM budgets WHERE tenant_id = ?", (budget.tenant_id,))
        else:
            await self._db.execute(
                "INSERT INTO budgets (tenant_id, daily_limit_nano_usd, monthly_limit_nano_usd)"
                " VALUES (?, ?, ?) ON CONFLICT (tenant_id) DO UPDATE SET"
                " daily_limit_nano_usd = excluded.daily_limit_nano_usd,"
                " monthly_limit_nano_usd = excluded.monthly_limit_nano_usd",
                (budget.tenant_id, budget.daily_limit_nano_usd, budget.monthly_limit_nano_usd),
            )
        await self._db.commit()

    async def get_budget(self, tenant_id: str) -> Budget | None:
        async with self._db.execute(
            "SELECT daily_limit_nano_usd, monthly_limit_nano_usd FROM budgets WHERE tenant_id = ?",
            (tenant_id,),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else Budget(tenant_id, int(row[0]), int(row[1]))

    async def check_budget(self, tenant_id: str, estimated_cost_nano_usd: int = 0) -> BudgetCheck:
        """May ``tenant_id`` spend ``estimated_cost_nano_usd`` more today?

        Without a budget: always allowed, limits 0. With one: allowed while there is
        headroom under every limit set and the estimate fits in it, so an estimate of 0
        asks "is anything left at all?".
        """
        if estimated_cost_nano_usd < 0:
            raise ValueError("estimated cost must not be negative")
        today = self.today()
        async with self._db.execute(
            "SELECT COALESCE(SUM(CASE WHEN day = ? THEN cost_nano_usd ELSE 0 END), 0),"
            " COALESCE(SUM(cost_nano_usd), 0)"
            " FROM usage WHERE tenant_id = ? AND day BETWEEN ? AND ?",
            (today, tenant_id, today[:8] + "01", today),
        ) as cursor:
            spent_today, spent_month = map(int, await cursor.fetchone())  # type: ignore[arg-type]
        budget = await self.get_budget(tenant_id) or Budget(tenant_id)
        headroom = [
            max(0, limit - spent)
            for limit, spent in (
                (budget.daily_limit_nano_usd, spent_today),
                (budget.monthly_limit_nano_usd, spent_month),
            )
            if limit > 0
        ]
        remaining = min(headroom, default=0)
        allowed = not headroom or (remaining > 0 and estimated_cost_nano_usd <= remaining)
        return BudgetCheck(
            allowed=allowed,
            daily_limit_nano_usd=budget.daily_limit_nano_usd,
            monthly_limit_nano_usd=budget.monthly_limit_nano_usd,
            spent_today_nano_usd=spent_today,
            spent_this_month_nano_usd=spent_month,
            remaining_nano_usd=remaining,
        )
