"""The SQLite ledger: the embedded default.

One connection per process in autocommit mode; a write of several statements (a
recording and the end of its hold, a budget check and its hold) is one ``BEGIN
IMMEDIATE`` transaction, which also takes the database's write lock, so checks
serialize across processes sharing the file as they do across PostgreSQL replicas.
Statements of one connection would otherwise join another coroutine's open transaction,
so every method runs under the connection's lock. WAL plus a busy timeout
(``trellis.runtime.sqlite.connect``) let several processes share a file (``trellis
up`` puts the run store and the ledger in one). Timestamps are ISO 8601 text and days
``YYYY-MM-DD`` text, which compare and group correctly as text; hold expiries are Unix
seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

import aiosqlite

from trellis.runtime import sqlite
from trellis.runtime.errors import AlreadyExists
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
BEGIN IMMEDIATE;
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
CREATE INDEX IF NOT EXISTS usage_tenant_run ON usage (tenant_id, run_id);
CREATE TABLE IF NOT EXISTS budgets (
    tenant_id TEXT PRIMARY KEY,
    daily_limit_nano_usd INTEGER NOT NULL DEFAULT 0,
    monthly_limit_nano_usd INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS budget_holds (
    tenant_id TEXT NOT NULL,
    reservation_id TEXT NOT NULL,
    amount_nano_usd INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (tenant_id, reservation_id)
);
CREATE TABLE IF NOT EXISTS spend_by_day (
    tenant_id TEXT NOT NULL,
    day TEXT NOT NULL,
    cost_nano_usd INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, day)
);
-- A ledger from before the running totals: fill them once (in this transaction, with
-- the trigger, so every row is counted once).
INSERT INTO spend_by_day (tenant_id, day, cost_nano_usd)
SELECT tenant_id, day, SUM(cost_nano_usd) FROM usage
WHERE NOT EXISTS (SELECT 1 FROM spend_by_day) GROUP BY tenant_id, day;
CREATE TRIGGER IF NOT EXISTS usage_count_spend AFTER INSERT ON usage BEGIN
    INSERT INTO spend_by_day (tenant_id, day, cost_nano_usd)
    VALUES (NEW.tenant_id, NEW.day, NEW.cost_nano_usd)
    ON CONFLICT (tenant_id, day)
    DO UPDATE SET cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd;
END;
COMMIT;
"""

#: A tenant's standing in one statement (see the PostgreSQL ledger's).
_STANDING = """
SELECT
    (SELECT daily_limit_nano_usd FROM budgets WHERE tenant_id = :tenant),
    (SELECT monthly_limit_nano_usd FROM budgets WHERE tenant_id = :tenant),
    (SELECT cost_nano_usd FROM spend_by_day WHERE tenant_id = :tenant AND day = :day),
    (SELECT SUM(cost_nano_usd) FROM spend_by_day
        WHERE tenant_id = :tenant AND day BETWEEN :first AND :last),
    (SELECT SUM(amount_nano_usd) FROM budget_holds
        WHERE tenant_id = :tenant AND expires_at > :now AND reservation_id <> :reservation),
    (SELECT amount_nano_usd FROM budget_holds
        WHERE tenant_id = :tenant AND expires_at > :now AND reservation_id = :reservation),
    EXISTS (SELECT 1 FROM budget_holds WHERE tenant_id = :tenant AND expires_at <= :now)
"""


#: Every budgeted tenant's standing (see the PostgreSQL ledger's).
_STANDINGS = """
SELECT b.tenant_id, b.daily_limit_nano_usd, b.monthly_limit_nano_usd,
    (SELECT cost_nano_usd FROM spend_by_day WHERE tenant_id = b.tenant_id AND day = :day),
    (SELECT SUM(cost_nano_usd) FROM spend_by_day
        WHERE tenant_id = b.tenant_id AND day BETWEEN :first AND :last),
    (SELECT SUM(amount_nano_usd) FROM budget_holds
        WHERE tenant_id = b.tenant_id AND expires_at > :now)
FROM budgets AS b
"""


#: Bound on the ``?`` of one statement (SQLite's default limit is 32,766).
_MAX_VARIABLES = 500


def _row(
    event: UsageEvent, cost: int, known: bool, clock: Clock
) -> tuple[tuple[object, ...], bool]:
    """The ``usage`` columns of ``event`` (cost at index 10, day at 13), and whether its
    price was known."""
    when = as_utc(event.occurred_at or clock())
    return (
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
        event.session_id,
    ), known


class SqliteLedger:
    """Usage rows, budgets and holds over one SQLite connection."""

    def __init__(self, db: aiosqlite.Connection, prices: PriceTable, clock: Clock) -> None:
        self._db = db
        self._prices = prices
        self._clock = clock
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, prices: PriceTable, *, clock: Clock = utc_now) -> SqliteLedger:
        """Connect to ``url`` and create the tables if they are missing."""
        db = await sqlite.connect(url, autocommit=True)
        try:
            await db.executescript(SCHEMA)
            await _add_session_column(db)
        except BaseException:
            await db.close()
            raise
        return cls(db, prices, clock)

    async def close(self) -> None:
        await self._db.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, alone, in a write transaction committed on success.

        aiosqlite runs statements in order on its thread even when their caller is
        cancelled, so BEGIN is inside the ``try``: a cancelled caller still queues the
        rollback behind it, and the next transaction starts clean.
        """
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
            except BaseException:
                await self._db.rollback()
                raise
            await self._db.commit()

    async def _fetchall(self, sql: str, args: object = ()) -> list[tuple]:
        async with self._lock, self._db.execute(sql, args) as cursor:  # type: ignore[arg-type]
            return list(await cursor.fetchall())  # type: ignore[arg-type]

    async def record(self, event: UsageEvent) -> Recorded:
        (result,) = await self.record_many([event])
        if isinstance(result, Exception):
            raise result
        return result

    async def record_many(self, events: Sequence[UsageEvent]) -> list[Recorded | AlreadyExists]:
        # Three statements whatever the number of events (each one a hop to aiosqlite's
        # thread): what is stored already, the new rows, the end of their holds. The
        # write lock (BEGIN IMMEDIATE) is held throughout, so nothing lands in between.
        rows = [_row(event, *price(self._prices, event), self._clock) for event in events]
        ids = list(dict.fromkeys(event.usage_id for event in events))
        async with self._transaction() as db:
            stored: dict[str, tuple[str, int, str]] = {}
            for first in range(0, len(ids), _MAX_VARIABLES):
                chunk = ids[first : first + _MAX_VARIABLES]
                marks = ",".join("?" * len(chunk))
                async with db.execute(
                    "SELECT usage_id, tenant_id, cost_nano_usd, day FROM usage"
                    f" WHERE usage_id IN ({marks})",
                    chunk,
                ) as cursor:
                    for usage_id, tenant_id, cost, day in await cursor.fetchall():
                        stored[usage_id] = (tenant_id, int(cost), day)
            await db.executemany(
                "INSERT INTO usage (usage_id, tenant_id, run_id, node_id, kind, model, tool,"
                " input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, estimated,"
                " occurred_at, day, session_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (usage_id) DO NOTHING",
                [row for row, _known in rows if row[0] not in stored],
            )
            await db.executemany(
                "DELETE FROM budget_holds WHERE tenant_id = ? AND reservation_id = ?",
                [(event.tenant_id, event.usage_id) for event in events],
            )
        results: list[Recorded | AlreadyExists] = []
        for event, (row, known) in zip(events, rows, strict=True):
            if event.usage_id not in stored:  # the first entry of this id: stored now
                stored[event.usage_id] = (event.tenant_id, row[10], row[13])
                results.append(Recorded(row[10], duplicate=False, day=row[13], price_known=known))
            elif stored[event.usage_id][0] != event.tenant_id:
                results.append(usage_id_taken(event.usage_id))
            else:
                _tenant, cost, day = stored[event.usage_id]
                results.append(Recorded(cost, duplicate=True, day=day))
        return results

    async def usage(
        self, tenant_id: str, start_day: str, end_day: str, session_id: str = ""
    ) -> UsageReport:
        session = " AND session_id = ?" if session_id else ""
        rows = await self._fetchall(
            "SELECT day, kind, CASE kind WHEN 'tool' THEN tool ELSE model END AS name,"
            " SUM(input_tokens), SUM(output_tokens), SUM(cached_input_tokens),"
            " SUM(cost_nano_usd), COUNT(*), SUM(estimated), SUM(estimated * input_tokens),"
            " SUM(estimated * output_tokens)"
            f" FROM usage WHERE tenant_id = ? AND day BETWEEN ? AND ?{session}"
            " GROUP BY day, kind, name ORDER BY day, kind, name",
            (tenant_id, start_day, end_day, *([session_id] if session_id else [])),
        )
        return report(
            [
                UsageRow(tenant_id, day, UsageKind(kind), name, *map(int, sums))
                for day, kind, name, *sums in rows
            ]
        )

    async def run_usage(self, tenant_id: str, run_id: str) -> RunUsage:
        rows = await self._fetchall(
            f"SELECT {RUN_COLUMNS} FROM usage WHERE tenant_id = ? AND run_id = ?"
            " ORDER BY occurred_at, usage_id",
            (tenant_id, run_id),
        )
        return run_usage(rows)

    async def set_budget(self, budget: Budget, limits: Collection[str] = BUDGET_LIMITS) -> Budget:
        check_limits(budget, limits)
        async with self._transaction() as db:
            stored = await _budget(db, budget.tenant_id) or Budget(budget.tenant_id)
            new = Budget(
                budget.tenant_id,
                *(getattr(budget if name in limits else stored, name) for name in BUDGET_LIMITS),
            )
            if new.limited:
                await db.execute(
                    "INSERT INTO budgets (tenant_id, daily_limit_nano_usd,"
                    " monthly_limit_nano_usd) VALUES (?, ?, ?) ON CONFLICT (tenant_id)"
                    " DO UPDATE SET daily_limit_nano_usd = excluded.daily_limit_nano_usd,"
                    " monthly_limit_nano_usd = excluded.monthly_limit_nano_usd",
                    (new.tenant_id, new.daily_limit_nano_usd, new.monthly_limit_nano_usd),
                )
            else:
                await db.execute("DELETE FROM budgets WHERE tenant_id = ?", (new.tenant_id,))
        return new

    async def get_budget(self, tenant_id: str) -> Budget | None:
        async with self._lock:
            return await _budget(self._db, tenant_id)

    async def standing(
        self, tenant_id: str, day: str, now: datetime, reservation_id: str = ""
    ) -> Standing:
        async with self._lock:
            standing, _expired = await _standing(self._db, tenant_id, day, now, reservation_id)
        return standing

    async def standings(self, day: str, now: datetime) -> list[Standing]:
        first, last = month_of(day)
        args = {"day": day, "first": first, "last": last, "now": now.timestamp()}
        return [standing_of(*row) for row in await self._fetchall(_STANDINGS, args)]

    async def decide_and_hold(
        self,
        tenant_id: str,
        day: str,
        now: datetime,
        reservation_id: str,
        expires_at: datetime,
        decide: Callable[[Standing], D],
    ) -> D:
        async with self._transaction() as db:
            standing, expired = await _standing(db, tenant_id, day, now, reservation_id)
            decision = decide(standing)
            if expired:
                await db.execute(
                    "DELETE FROM budget_holds WHERE tenant_id = ? AND expires_at <= ?",
                    (tenant_id, now.timestamp()),
                )
            if decision.hold_nano_usd > 0:
                await db.execute(
                    "INSERT INTO budget_holds (tenant_id, reservation_id, amount_nano_usd,"
                    " expires_at) VALUES (?, ?, ?, ?) ON CONFLICT (tenant_id, reservation_id)"
                    " DO UPDATE SET amount_nano_usd = excluded.amount_nano_usd",
                    (tenant_id, reservation_id, decision.hold_nano_usd, expires_at.timestamp()),
                )
            elif standing.held_nano_usd:
                await db.execute(
                    "DELETE FROM budget_holds WHERE tenant_id = ? AND reservation_id = ?",
                    (tenant_id, reservation_id),
                )
        return decision


async def _budget(db: aiosqlite.Connection, tenant_id: str) -> Budget | None:
    async with db.execute(
        "SELECT daily_limit_nano_usd, monthly_limit_nano_usd FROM budgets WHERE tenant_id = ?",
        (tenant_id,),
    ) as cursor:
        row = await cursor.fetchone()
    return None if row is None else Budget(tenant_id, int(row[0]), int(row[1]))


async def _standing(
    db: aiosqlite.Connection, tenant_id: str, day: str, now: datetime, reservation_id: str
) -> tuple[Standing, bool]:
    """The standing, and whether the tenant has expired holds to delete."""
    first, last = month_of(day)
    args = {
        "tenant": tenant_id,
        "day": day,
        "first": first,
        "last": last,
        "now": now.timestamp(),
        "reservation": reservation_id,
    }
    async with db.execute(_STANDING, args) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    daily, monthly, today, month, reserved, held, expired = row
    return standing_of(tenant_id, daily, monthly, today, month, reserved, held), bool(expired)


async def _add_session_column(db: aiosqlite.Connection) -> None:
    """``usage.session_id``, added to a ledger file made before sessions existed."""
    columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(usage)")}
    if "session_id" not in columns:
        await db.execute("ALTER TABLE usage ADD COLUMN session_id TEXT NOT NULL DEFAULT ''")
    await db.execute(
        "CREATE INDEX IF NOT EXISTS usage_tenant_session ON usage (tenant_id, session_id, day)"
        " WHERE session_id <> ''"
    )
