"""The PostgreSQL ledger: what several cost-accounting replicas share.

asyncpg with a connection pool; every statement runs in autocommit, so a write is
durable when the method returns, the same promise the SQLite ledger makes. A
statement cut by a database restart or fail-over is retried on a fresh connection for
a few seconds (``trellis.runtime.postgres``); recording is an idempotent insert, so a
retry never counts usage twice. Days are DATE and timestamps TIMESTAMPTZ; otherwise
the schema is the SQLite one, and reports sort names with the "C" collation so both
backends list rows in the same order.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import date
from typing import Any

import asyncpg

from trellis.runtime.postgres import ReconnectingPool, open_pool
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
    input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens BIGINT NOT NULL DEFAULT 0,
    cost_nano_usd BIGINT NOT NULL,
    estimated BOOLEAN NOT NULL DEFAULT false,
    occurred_at TIMESTAMPTZ NOT NULL,
    day DATE NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_tenant_day ON usage (tenant_id, day);
CREATE TABLE IF NOT EXISTS budgets (
    tenant_id TEXT PRIMARY KEY,
    daily_limit_nano_usd BIGINT NOT NULL DEFAULT 0,
    monthly_limit_nano_usd BIGINT NOT NULL DEFAULT 0
);
"""

#: Serializes schema creation: replicas starting together would otherwise race on
#: CREATE TABLE IF NOT EXISTS (it is not atomic in PostgreSQL).
_SCHEMA_LOCK = 0x6C6564676572  # "ledger"


def _day(text: str) -> date:
    return date.fromisoformat(text)


class PostgresLedger:
    """Usage rows and budgets over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, prices: PriceTable, clock: Clock) -> None:
        self._pool = ReconnectingPool(pool, what="ledger", reason="LEDGER_UNAVAILABLE")
        self._prices = prices
        self._clock = clock

    @classmethod
    async def open(
        cls,
        url: str,
        prices: PriceTable,
        *,
        clock: Clock = utc_now,
        min_size: int = 1,
        max_size: int = 10,
    ) -> PostgresLedger:
        """Connect to ``url`` and create the tables if they are missing."""
        pool = await open_pool(
            url, SCHEMA, schema_lock=_SCHEMA_LOCK, min_size=min_size, max_size=max_size
        )
        return cls(pool, prices, clock)

    async def close(self) -> None:
        await self._pool.close()

    async def record(self, event: UsageEvent) -> Recorded:
        cost, known = price(self._prices, event)
        when = as_utc(event.occurred_at or self._clock())
        day = when.date()
        inserted = await self._pool.fetchval(
            "INSERT INTO usage (usage_id, tenant_id, run_id, node_id, kind, model, tool,"
            " input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, estimated,"
            " occurred_at, day) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14) ON CONFLICT (usage_id) DO NOTHING RETURNING true",
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
            event.estimated,
            when,
            day,
        )
        if inserted:
            return Recorded(cost, duplicate=False, day=day.isoformat(), price_known=known)
        row = await self._pool.fetchrow(
            "SELECT tenant_id, cost_nano_usd, day FROM usage WHERE usage_id = $1", event.usage_id
        )
        if row["tenant_id"] != event.tenant_id:
            raise usage_id_taken(event.usage_id)
        return Recorded(row["cost_nano_usd"], duplicate=True, day=row["day"].isoformat())

    async def usage(self, tenant_id: str, start_day: str, end_day: str) -> UsageReport:
        rows = await self._pool.fetch(
            "SELECT day, kind, name, SUM(input_tokens)::bigint, SUM(output_tokens)::bigint,"
            " SUM(cached_input_tokens)::bigint, SUM(cost_nano_usd)::bigint, COUNT(*)"
            " FROM (SELECT *, CASE kind WHEN 'tool' THEN tool ELSE model END AS name"
            " FROM usage WHERE tenant_id = $1 AND day BETWEEN $2 AND $3) AS u"
            ' GROUP BY day, kind, name ORDER BY day, kind, name COLLATE "C"',
            tenant_id,
            _day(start_day),
            _day(end_day),
        )
        return report(
            [
                UsageRow(tenant_id, day.isoformat(), UsageKind(kind), name, *sums)
                for day, kind, name, *sums in rows
            ]
        )

    async def set_budget(self, budget: Budget) -> None:
        check_limits(budget)
        if not budget.limited:
            await self._pool.execute("DELETE FROM budgets WHERE tenant_id = $1", budget.tenant_id)
            return
        await self._pool.execute(
            "INSERT INTO budgets (tenant_id, daily_limit_nano_usd, monthly_limit_nano_usd)"
            " VALUES ($1, $2, $3) ON CONFLICT (tenant_id) DO UPDATE SET"
            " daily_limit_nano_usd = excluded.daily_limit_nano_usd,"
            " monthly_limit_nano_usd = excluded.monthly_limit_nano_usd",
            budget.tenant_id,
            budget.daily_limit_nano_usd,
            budget.monthly_limit_nano_usd,
        )

    async def get_budget(self, tenant_id: str) -> Budget | None:
        row = await self._pool.fetchrow(
            "SELECT daily_limit_nano_usd, monthly_limit_nano_usd FROM budgets WHERE tenant_id = $1",
            tenant_id,
        )
        return None if row is None else Budget(tenant_id, row[0], row[1])

    async def spending(self, tenant_id: str, day: str, usage_ids: Collection[str] = ()) -> Spending:
        first, last = month_of(day)

        async def read(conn: asyncpg.Connection) -> tuple[frozenset[str], Any, Any]:
            recorded: frozenset[str] = frozenset()
            if usage_ids:
                found = await conn.fetch(
                    "SELECT usage_id FROM usage WHERE tenant_id = $1 AND usage_id = ANY($2)",
                    tenant_id,
                    list(usage_ids),
                )
                recorded = frozenset(row[0] for row in found)
            # Read committed: each statement sees what was committed before it began, so
            # a usage id found above is in these sums.
            sums = await conn.fetchrow(
                "SELECT COALESCE(SUM(cost_nano_usd) FILTER (WHERE day = $2), 0)::bigint,"
                " COALESCE(SUM(cost_nano_usd), 0)::bigint"
                " FROM usage WHERE tenant_id = $1 AND day BETWEEN $3 AND $4",
                tenant_id,
                _day(day),
                _day(first),
                _day(last),
            )
            limits = await conn.fetchrow(
                "SELECT daily_limit_nano_usd, monthly_limit_nano_usd FROM budgets"
                " WHERE tenant_id = $1",
                tenant_id,
            )
            return recorded, sums, limits

        recorded, sums, limits = await self._pool.run(read)
        budget = Budget(tenant_id, *limits) if limits else Budget(tenant_id)
        return Spending(budget, sums[0], sums[1], recorded)
