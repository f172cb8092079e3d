"""The SQLite ledger: the embedded default.

One connection per process in autocommit mode: every write is one statement, so it
is durable when its ``execute`` returns. WAL plus a busy timeout
(``trellis.runtime.sqlite.connect``) let several processes share a file (``trellis
up`` puts the run store and the ledger in one). Timestamps are ISO 8601 text and days
``YYYY-MM-DD`` text, which compare and group correctly as text.
"""

from __future__ import annotations

import json
from collections.abc import Collection

import aiosqlite

from trellis.runtime import sqlite
from trellis_costs.ledger.base import (
    Budget,
    Clock,
    Recorded,
    Spending,
    UsageEvent,
    UsageKind,
    UsageReport,
    UsageRow,
    as_utc,
    check_limits,
    month_of,
    price,
    report,
    usage_id_taken,
    utc_now,
)
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


class SqliteLedger:
    """Usage rows and budgets over one SQLite connection."""

    def __init__(self, db: aiosqlite.Connection, prices: PriceTable, clock: Clock) -> None:
        self._db = db
        self._prices = prices
        self._clock = clock

    @classmethod
    async def open(cls, url: str, prices: PriceTable, *, clock: Clock = utc_now) -> SqliteLedger:
        """Connect to ``url`` and create the tables if they are missing."""
        db = await sqlite.connect(url, autocommit=True)
        try:
            await db.executescript(SCHEMA)
        except BaseException:
            await db.close()
            raise
        return cls(db, prices, clock)

    async def close(self) -> None:
        await self._db.close()

    async def record(self, event: UsageEvent) -> Recorded:
        cost, known = price(self._prices, event)
        when = as_utc(event.occurred_at or self._clock())
        day = when.date().isoformat()
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
                day,
            ),
        )
        inserted = cursor.rowcount == 1
        await cursor.close()
        if inserted:
            return Recorded(cost, duplicate=False, day=day, price_known=known)
        async with self._db.execute(
            "SELECT tenant_id, cost_nano_usd, day FROM usage WHERE usage_id = ?",
            (event.usage_id,),
        ) as rows:
            tenant_id, stored_cost, stored_day = await rows.fetchone()  # type: ignore[misc]
        if tenant_id != event.tenant_id:
            raise usage_id_taken(event.usage_id)
        return Recorded(int(stored_cost), duplicate=True, day=stored_day)

    async def usage(self, tenant_id: str, start_day: str, end_day: str) -> UsageReport:
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
        return report(rows)

    async def set_budget(self, budget: Budget) -> None:
        check_limits(budget)
        if not budget.limited:
            await self._db.execute("DELETE FROM budgets WHERE tenant_id = ?", (budget.tenant_id,))
            return
        await self._db.execute(
            "INSERT INTO budgets (tenant_id, daily_limit_nano_usd, monthly_limit_nano_usd)"
            " VALUES (?, ?, ?) ON CONFLICT (tenant_id) DO UPDATE SET"
            " daily_limit_nano_usd = excluded.daily_limit_nano_usd,"
            " monthly_limit_nano_usd = excluded.monthly_limit_nano_usd",
            (budget.tenant_id, budget.daily_limit_nano_usd, budget.monthly_limit_nano_usd),
        )

    async def get_budget(self, tenant_id: str) -> Budget | None:
        async with self._db.execute(
            "SELECT daily_limit_nano_usd, monthly_limit_nano_usd FROM budgets WHERE tenant_id = ?",
            (tenant_id,),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else Budget(tenant_id, int(row[0]), int(row[1]))

    async def spending(self, tenant_id: str, day: str, usage_ids: Collection[str] = ()) -> Spending:
        recorded: frozenset[str] = frozenset()
        if usage_ids:
            async with self._db.execute(
                "SELECT usage_id FROM usage WHERE tenant_id = ?"
                " AND usage_id IN (SELECT value FROM json_each(?))",
                (tenant_id, json.dumps(list(usage_ids))),
            ) as cursor:
                recorded = frozenset(row[0] for row in await cursor.fetchall())
        async with self._db.execute(
            "SELECT COALESCE(SUM(CASE WHEN day = ? THEN cost_nano_usd ELSE 0 END), 0),"
            " COALESCE(SUM(cost_nano_usd), 0)"
            " FROM usage WHERE tenant_id = ? AND day BETWEEN ? AND ?",
            (day, tenant_id, *month_of(day)),
        ) as cursor:
            today, month = map(int, await cursor.fetchone())  # type: ignore[arg-type]
        budget = await self.get_budget(tenant_id) or Budget(tenant_id)
        return Spending(budget, today, month, recorded)
