"""The PostgreSQL ledger: what several cost-accounting replicas share.

asyncpg with a connection pool. Every method is one statement (autocommit) or one
transaction, so a write is durable when the method returns, the same promise the
SQLite ledger makes. A statement or transaction cut by a database restart or fail-over
is run again on a fresh connection for a few seconds (``trellis.runtime.postgres``):
recording is an idempotent insert and a check rewrites the same hold, so a retry never
counts twice. Days are DATE and timestamps TIMESTAMPTZ; otherwise the schema is the
SQLite one, and reports sort names with the "C" collation so both backends list rows
in the same order.

Checks of one tenant serialize on its ``budgets`` row (``SELECT ... FOR UPDATE``), on
whichever replica they run; a tenant without a budget has no row and nothing to hold.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import date, datetime
from typing import Any

import asyncpg

from trellis.runtime.errors import AlreadyExists
from trellis.runtime.postgres import ReconnectingPool, open_pool
from trellis_costs.ledger.base import (
    BUDGET_LIMITS,
    RUN_COLUMNS,
    Budget,
    Clock,
    D,
    Recorded,
    RunUsage,
    Standing,
    UsageEvent,
    UsageKind,
    UsageReport,
    UsageRow,
    as_utc,
    check_limits,
    month_of,
    price,
    report,
    run_usage,
    standing_of,
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
CREATE INDEX IF NOT EXISTS usage_tenant_run ON usage (tenant_id, run_id);
ALTER TABLE usage ADD COLUMN IF NOT EXISTS session_id TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS usage_tenant_session ON usage (tenant_id, session_id, day)
    WHERE session_id <> '';
CREATE TABLE IF NOT EXISTS budgets (
    tenant_id TEXT PRIMARY KEY,
    daily_limit_nano_usd BIGINT NOT NULL DEFAULT 0,
    monthly_limit_nano_usd BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS budget_holds (
    tenant_id TEXT NOT NULL,
    reservation_id TEXT NOT NULL,
    amount_nano_usd BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, reservation_id)
);
CREATE TABLE IF NOT EXISTS spend_by_day (
    tenant_id TEXT NOT NULL,
    day DATE NOT NULL,
    cost_nano_usd BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, day)
);
CREATE OR REPLACE FUNCTION ledger_count_spend() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO spend_by_day (tenant_id, day, cost_nano_usd)
    VALUES (NEW.tenant_id, NEW.day, NEW.cost_nano_usd)
    ON CONFLICT (tenant_id, day)
    DO UPDATE SET cost_nano_usd = spend_by_day.cost_nano_usd + excluded.cost_nano_usd;
    RETURN NULL;
END $$;
-- Made before the fill below: it locks out inserts until this transaction commits, so
-- every row is counted once, by the fill or by the trigger.
CREATE OR REPLACE TRIGGER usage_count_spend AFTER INSERT ON usage
    FOR EACH ROW EXECUTE FUNCTION ledger_count_spend();
-- A ledger from before the running totals: fill them once.
INSERT INTO spend_by_day (tenant_id, day, cost_nano_usd)
SELECT tenant_id, day, SUM(cost_nano_usd) FROM usage
WHERE NOT EXISTS (SELECT 1 FROM spend_by_day) GROUP BY tenant_id, day;
"""

#: Serializes schema creation: replicas starting together would otherwise race on
#: CREATE TABLE IF NOT EXISTS (it is not atomic in PostgreSQL).
_SCHEMA_LOCK = 0x6C6564676572  # "ledger"

#: A tenant's standing in one statement: $1 tenant, $2 day, $3/$4 its month, $5 now,
#: $6 the reservation asked about.
_STANDING = """
SELECT
    (SELECT daily_limit_nano_usd FROM budgets WHERE tenant_id = $1),
    (SELECT monthly_limit_nano_usd FROM budgets WHERE tenant_id = $1),
    (SELECT cost_nano_usd FROM spend_by_day WHERE tenant_id = $1 AND day = $2),
    (SELECT SUM(cost_nano_usd) FROM spend_by_day
        WHERE tenant_id = $1 AND day BETWEEN $3 AND $4)::bigint,
    (SELECT SUM(amount_nano_usd) FROM budget_holds
        WHERE tenant_id = $1 AND expires_at > $5 AND reservation_id <> $6)::bigint,
    (SELECT amount_nano_usd FROM budget_holds
        WHERE tenant_id = $1 AND expires_at > $5 AND reservation_id = $6),
    EXISTS (SELECT 1 FROM budget_holds WHERE tenant_id = $1 AND expires_at <= $5)
"""


#: Every budgeted tenant's standing: $1 day, $2/$3 its month, $4 now.
_STANDINGS = """
SELECT b.tenant_id, b.daily_limit_nano_usd, b.monthly_limit_nano_usd,
    (SELECT cost_nano_usd FROM spend_by_day WHERE tenant_id = b.tenant_id AND day = $1),
    (SELECT SUM(cost_nano_usd) FROM spend_by_day
        WHERE tenant_id = b.tenant_id AND day BETWEEN $2 AND $3)::bigint,
    (SELECT SUM(amount_nano_usd) FROM budget_holds
        WHERE tenant_id = b.tenant_id AND expires_at > $4)::bigint
FROM budgets AS b
"""


#: Many usage rows in one statement; returns the usage ids it inserted.
_INSERT_MANY = """
INSERT INTO usage (usage_id, tenant_id, run_id, node_id, kind, model, tool, input_tokens,
    output_tokens, cached_input_tokens, cost_nano_usd, estimated, occurred_at, day, session_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::boolean[],
    $13::timestamptz[], $14::date[], $15::text[])
ON CONFLICT (usage_id) DO NOTHING
RETURNING usage_id
"""


def _day(text: str) -> date:
    return date.fromisoformat(text)


class PostgresLedger:
    """Usage rows, budgets and holds over an asyncpg pool."""

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
        (result,) = await self.record_many([event])
        if isinstance(result, Exception):
            raise result
        return result

    async def record_many(self, events: Sequence[UsageEvent]) -> list[Recorded | AlreadyExists]:
        priced = [(event, *price(self._prices, event)) for event in events]
        whens = [as_utc(event.occurred_at or self._clock()) for event in events]
        columns = (
            [e.usage_id for e in events],
            [e.tenant_id for e in events],
            [e.run_id for e in events],
            [e.node_id for e in events],
            [e.kind.value for e in events],
            [e.model for e in events],
            [e.tool for e in events],
            [e.input_tokens for e in events],
            [e.output_tokens for e in events],
            [e.cached_input_tokens for e in events],
            [cost for _e, cost, _known in priced],
            [e.estimated for e in events],
            whens,
            [when.date() for when in whens],
            [e.session_id for e in events],
        )

        async def write(conn: asyncpg.Connection) -> tuple[set[str], dict[str, Any]]:
            # One transaction of three statements, whatever the number of events: the
            # rows (their trigger adds them to spend_by_day), the end of their holds,
            # and what was stored before for the repeats.
            async with conn.transaction():
                inserted = await conn.fetch(_INSERT_MANY, *columns)
                await conn.execute(
                    "DELETE FROM budget_holds AS h USING unnest($1::text[], $2::text[])"
                    " AS s(tenant_id, reservation_id) WHERE h.tenant_id = s.tenant_id"
                    " AND h.reservation_id = s.reservation_id",
                    columns[1],
                    columns[0],
                )
                new = {row[0] for row in inserted}
                repeats = [usage_id for usage_id in columns[0] if usage_id not in new]
                stored = (
                    await conn.fetch(
                        "SELECT usage_id, tenant_id, cost_nano_usd, day FROM usage"
                        " WHERE usage_id = ANY($1::text[])",
                        repeats,
                    )
                    if repeats
                    else []
                )
            return new, {row["usage_id"]: row for row in stored}

        new, stored = await self._pool.run(write)
        results: list[Recorded | AlreadyExists] = []
        first: dict[str, Recorded] = {}
        for (event, cost, known), when in zip(priced, whens, strict=True):
            day = when.date().isoformat()
            if event.usage_id in first:  # repeated within this batch
                earlier = first[event.usage_id]
                results.append(Recorded(earlier.cost_nano_usd, duplicate=True, day=earlier.day))
            elif event.usage_id in new:
                first[event.usage_id] = Recorded(cost, False, day, price_known=known)
                results.append(first[event.usage_id])
            elif stored[event.usage_id]["tenant_id"] != event.tenant_id:
                results.append(usage_id_taken(event.usage_id))
            else:
                row = stored[event.usage_id]
                results.append(
                    Recorded(row["cost_nano_usd"], duplicate=True, day=row["day"].isoformat())
                )
        return results

    async def usage(
        self, tenant_id: str, start_day: str, end_day: str, session_id: str = ""
    ) -> UsageReport:
        rows = await self._pool.fetch(
            "SELECT day, kind, name, SUM(input_tokens)::bigint, SUM(output_tokens)::bigint,"
            " SUM(cached_input_tokens)::bigint, SUM(cost_nano_usd)::bigint, COUNT(*),"
            " COUNT(*) FILTER (WHERE estimated),"
            " COALESCE(SUM(input_tokens) FILTER (WHERE estimated), 0)::bigint,"
            " COALESCE(SUM(output_tokens) FILTER (WHERE estimated), 0)::bigint"
            " FROM (SELECT *, CASE kind WHEN 'tool' THEN tool ELSE model END AS name"
            " FROM usage WHERE tenant_id = $1 AND day BETWEEN $2 AND $3"
            " AND ($4 = '' OR (session_id = $4 AND session_id <> ''))) AS u"
            ' GROUP BY day, kind, name ORDER BY day, kind, name COLLATE "C"',
            tenant_id,
            _day(start_day),
            _day(end_day),
            session_id,
        )
        return report(
            [
                UsageRow(tenant_id, day.isoformat(), UsageKind(kind), name, *sums)
                for day, kind, name, *sums in rows
            ]
        )

    async def run_usage(self, tenant_id: str, run_id: str) -> RunUsage:
        rows = await self._pool.fetch(
            f"SELECT {RUN_COLUMNS} FROM usage WHERE tenant_id = $1 AND run_id = $2"
            " ORDER BY occurred_at, usage_id",
            tenant_id,
            run_id,
        )
        return run_usage(tuple(row) for row in rows)

    async def set_budget(self, budget: Budget, limits: Collection[str] = BUDGET_LIMITS) -> Budget:
        check_limits(budget, limits)
        keep_daily = "daily_limit_nano_usd" not in limits
        keep_monthly = "monthly_limit_nano_usd" not in limits

        async def write(conn: asyncpg.Connection) -> Budget:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "INSERT INTO budgets (tenant_id, daily_limit_nano_usd,"
                    " monthly_limit_nano_usd) VALUES ($1, $2, $3) ON CONFLICT (tenant_id)"
                    " DO UPDATE SET"
                    " daily_limit_nano_usd = CASE WHEN $4 THEN budgets.daily_limit_nano_usd"
                    " ELSE excluded.daily_limit_nano_usd END,"
                    " monthly_limit_nano_usd = CASE WHEN $5 THEN budgets.monthly_limit_nano_usd"
                    " ELSE excluded.monthly_limit_nano_usd END"
                    " RETURNING daily_limit_nano_usd, monthly_limit_nano_usd",
                    budget.tenant_id,
                    0 if keep_daily else budget.daily_limit_nano_usd,
                    0 if keep_monthly else budget.monthly_limit_nano_usd,
                    keep_daily,
                    keep_monthly,
                )
                stored = Budget(budget.tenant_id, row[0], row[1])
                if not stored.limited:
                    await conn.execute("DELETE FROM budgets WHERE tenant_id = $1", budget.tenant_id)
                return stored

        return await self._pool.run(write)

    async def get_budget(self, tenant_id: str) -> Budget | None:
        row = await self._pool.fetchrow(
            "SELECT daily_limit_nano_usd, monthly_limit_nano_usd FROM budgets WHERE tenant_id = $1",
            tenant_id,
        )
        return None if row is None else Budget(tenant_id, row[0], row[1])

    async def standing(
        self, tenant_id: str, day: str, now: datetime, reservation_id: str = ""
    ) -> Standing:
        async def read(conn: asyncpg.Connection) -> Standing:
            standing, _expired = await _standing(conn, tenant_id, day, now, reservation_id)
            return standing

        return await self._pool.run(read)

    async def standings(self, day: str, now: datetime) -> list[Standing]:
        first, last = month_of(day)
        rows = await self._pool.fetch(_STANDINGS, _day(day), _day(first), _day(last), now)
        return [standing_of(*row) for row in rows]

    async def decide_and_hold(
        self,
        tenant_id: str,
        day: str,
        now: datetime,
        reservation_id: str,
        expires_at: datetime,
        decide: Callable[[Standing], D],
    ) -> D:
        async def check(conn: asyncpg.Connection) -> D:
            async with conn.transaction():
                # Lock the tenant's budget row (none: no budget, nothing to hold). A hold
                # is worth no disk flush: lost in a database crash, it only lets one
                # estimate through unheld.
                await conn.execute(
                    "SELECT set_config('synchronous_commit', 'off', true),"
                    " EXISTS (SELECT 1 FROM budgets WHERE tenant_id = $1 FOR UPDATE)",
                    tenant_id,
                )
                standing, expired = await _standing(conn, tenant_id, day, now, reservation_id)
                decision = decide(standing)
                if expired:
                    await conn.execute(
                        "DELETE FROM budget_holds WHERE tenant_id = $1 AND expires_at <= $2",
                        tenant_id,
                        now,
                    )
                if decision.hold_nano_usd > 0:
                    await conn.execute(
                        "INSERT INTO budget_holds (tenant_id, reservation_id, amount_nano_usd,"
                        " expires_at) VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id,"
                        " reservation_id) DO UPDATE SET amount_nano_usd = excluded.amount_nano_usd",
                        tenant_id,
                        reservation_id,
                        decision.hold_nano_usd,
                        expires_at,
                    )
                elif standing.held_nano_usd:
                    await conn.execute(
                        "DELETE FROM budget_holds WHERE tenant_id = $1 AND reservation_id = $2",
                        tenant_id,
                        reservation_id,
                    )
                return decision

        return await self._pool.run(check)


async def _standing(
    conn: asyncpg.Connection, tenant_id: str, day: str, now: datetime, reservation_id: str
) -> tuple[Standing, bool]:
    """The standing, and whether the tenant has expired holds to delete."""
    first, last = month_of(day)
    row = await conn.fetchrow(
        _STANDING, tenant_id, _day(day), _day(first), _day(last), now, reservation_id
    )
    daily, monthly, today, month, reserved, held, expired = row
    return standing_of(tenant_id, daily, monthly, today, month, reserved, held), bool(expired)
