"""The PostgreSQL run store: what several executor replicas share.

asyncpg with a connection pool; a write is durable when the method returns, the same
promise the SQLite store makes. The writes of a run's state (nodes, outcomes, progress,
the end) go through a group commit (``trellis.runtime.coalescing``): those submitted while a commit
runs are committed together in the next transaction, so the writes of one scheduler
step cost one synchronous commit, not one each; other statements run in autocommit.
Every statement is retried on a fresh connection after a connection error for a few
seconds (``trellis.runtime.postgres``), so a database restart or fail-over delays a
run's writes instead of failing the run; a write whose connection dropped after it
committed is recognised on its retry (the row is this owner's), not reported as a clash.
Timestamps are TIMESTAMPTZ and protobuf blobs BYTEA; otherwise the schema is the
SQLite one. Leases are timed by the database's clock (``now()``), so replicas with
skewed clocks still agree on when a lease has expired. The session queries are in
``postgres_sessions``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.coalescing import Coalescer
from trellis.runtime.errors import FailedPrecondition
from trellis.runtime.postgres import ReconnectingPool, open_pool
from trellis_executor.store import sessions as session_rows
from trellis_executor.store.base import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_OWNER,
    NODE_STATUS_FILLED,
    PAGE_TOKEN_KEY,
    SUMMARY_COLUMNS,
    Cursor,
    Progress,
    Resumable,
    RunQuery,
    add_node_counts,
    add_nodes,
    build_run,
    build_summary,
    from_micros,
    lease_lost,
    new_page_token_key,
    outcome_status,
    resumable,
    run_exists,
    to_micros,
)
from trellis_executor.store.postgres_sessions import RUNNING, PostgresSessions

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    goal TEXT NOT NULL,
    status INTEGER NOT NULL,
    request BYTEA NOT NULL,
    trace_id TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished BYTEA,
    finished_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS run_nodes (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    call BYTEA NOT NULL,
    outcome BYTEA,
    PRIMARY KEY (run_id, node_id)
);
ALTER TABLE runs ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE runs ADD COLUMN IF NOT EXISTS progress TEXT;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS span_id TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN IF NOT EXISTS cancel_requested BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS resumes INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS runs_running_lease ON runs (lease_until) WHERE status = 1;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS session_id TEXT NOT NULL DEFAULT '';
ALTER TABLE run_nodes ADD COLUMN IF NOT EXISTS status INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS runs_by_tenant ON runs (tenant_id, created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_by_tenant_status ON runs (tenant_id, status, created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_by_tenant_session
    ON runs (tenant_id, session_id, created_at, run_id) WHERE session_id <> '';
CREATE TABLE IF NOT EXISTS store_meta (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    summary_through_turn INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, session_id)
);
CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (tenant_id, updated_at, session_id);
"""

#: Serializes schema creation: two replicas starting together would otherwise race
#: on CREATE TABLE IF NOT EXISTS (it is not atomic in PostgreSQL).
_SCHEMA_LOCK = 0x7472656C6C6973  # "trellis"

#: "this owner holds the run": the fence on every write of a run's state.
_OWNED = "EXISTS (SELECT 1 FROM runs r WHERE r.run_id = $1 AND r.owner = $2)"
_LEASE = "now() + make_interval(secs => $2)"
#: A session's turns ($1 tenant, $2 session): its runs since it (re)started.
_TURNS = (
    "tenant_id = $1 AND session_id = $2 AND created_at >= (SELECT created_at FROM sessions"
    " WHERE tenant_id = $1 AND session_id = $2)"
)
#: Most state writes one transaction carries.
MAX_GROUP = 256
#: Locks the rows of several runs in run_id order: a group commit and the lease upkeep
#: (which locks in the same order) never wait on each other in a cycle (a deadlock).
_LOCK_RUNS = "SELECT 1 FROM runs WHERE run_id = ANY($1::text[]) ORDER BY run_id FOR NO KEY UPDATE"


def _count(status: str) -> int:
    """Rows touched, from asyncpg's command tag ("UPDATE 1", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[-1])


class _Retried:
    """Set when a statement was tried again after a connection error: its first try
    may have committed, so a unique violation can be this owner's own row."""

    yes = False

    def __call__(self) -> None:
        self.yes = True


@dataclass(frozen=True)
class _Write:
    """A fenced write: ``sql`` takes $1 run_id, $2 owner, then ``args``."""

    run_id: str
    sql: str
    args: tuple[object, ...]


async def _error_of(write: Awaitable[None]) -> BaseException | None:
    try:
        await write
    except Exception as error:
        return error
    return None


class PostgresRunStore(PostgresSessions):
    """Async PostgreSQL run store over an asyncpg pool, for one owner."""

    def __init__(
        self, pool: asyncpg.Pool, owner: str, lease_seconds: float, page_token_key: bytes
    ) -> None:
        self._pool = ReconnectingPool(pool, what="run store", reason="RUN_STORE_UNAVAILABLE")
        self.owner = owner
        self._lease = lease_seconds
        self.page_token_key = page_token_key
        self._writes: Coalescer[_Write, None] = Coalescer(
            self._commit_many, max_group=MAX_GROUP, name="store-group-commit"
        )

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        owner: str = DEFAULT_OWNER,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        min_size: int = 1,
        max_size: int = 10,
    ) -> PostgresRunStore:
        pool = await open_pool(
            url, SCHEMA, schema_lock=_SCHEMA_LOCK, min_size=min_size, max_size=max_size
        )
        try:
            async with pool.acquire() as conn:
                await _fill_node_status(conn)
                key = await conn.fetchval(
                    "INSERT INTO store_meta (name, value) VALUES ($1, $2) ON CONFLICT (name)"
                    " DO UPDATE SET value = store_meta.value RETURNING value",
                    PAGE_TOKEN_KEY,
                    new_page_token_key(),
                )
        except BaseException:
            await pool.close()
            raise
        return cls(pool, owner, lease_seconds, bytes(key))

    async def close(self) -> None:
        await self._writes.aclose()
        await self._pool.close()

    async def create(
        self,
        run_id: str,
        tenant_id: str,
        request: executor_pb2.RunRequest,
        trace_id: str,
        span_id: str = "",
        session_id: str = "",
        rules: session_rows.SessionRules | None = None,
    ) -> None:
        if session_id and rules is not None:
            await self._create_turn(
                run_id, tenant_id, request, trace_id, span_id, session_id, rules
            )
            return
        retried = _Retried()
        try:
            await self._pool.run(
                lambda conn: self._insert_run(
                    conn, run_id, tenant_id, request, trace_id, span_id, session_id
                ),
                on_retry=retried,
            )
        except asyncpg.UniqueViolationError:
            if await self._committed_before(retried, run_id, trace_id):
                return  # the first try committed before its connection dropped
            raise run_exists(run_id) from None

    async def _committed_before(self, retried: _Retried, run_id: str, trace_id: str) -> bool:
        """Whether a retried create failed only because its first try had committed
        before its connection dropped (the row is this replica's, for this trace)."""
        return retried.yes and bool(
            await self._pool.fetchval(
                "SELECT true FROM runs WHERE run_id = $1 AND owner = $2 AND trace_id = $3",
                run_id,
                self.owner,
                trace_id,
            )
        )

    async def _insert_run(
        self,
        conn: asyncpg.Connection,
        run_id: str,
        tenant_id: str,
        request: executor_pb2.RunRequest,
        trace_id: str,
        span_id: str,
        session_id: str,
    ) -> None:
        """The new run's row, leased to this replica."""
        await conn.execute(
            "INSERT INTO runs (run_id, owner, lease_until, tenant_id, goal, status,"
            " request, trace_id, span_id, session_id)"
            f" VALUES ($1, $3, {_LEASE}, $4, $5, $6, $7, $8, $9, $10)",
            run_id,
            self._lease,
            self.owner,
            tenant_id,
            request.goal,
            RUNNING,
            request.SerializeToString(),
            trace_id,
            span_id,
            session_id,
        )

    async def _create_turn(
        self,
        run_id: str,
        tenant_id: str,
        request: executor_pb2.RunRequest,
        trace_id: str,
        span_id: str,
        session_id: str,
        rules: session_rows.SessionRules,
    ) -> None:
        """One transaction: the session's row (started again when it expired or was
        deleted) locked, the idle and turn-count checks, then the run. Replicas admitting
        turns of one session at once queue on the row lock, so one wins."""

        async def block(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO sessions AS s (tenant_id, session_id) VALUES ($1, $2)"
                    " ON CONFLICT (tenant_id, session_id) DO UPDATE SET"
                    " created_at = CASE WHEN s.deleted OR s.updated_at < now()"
                    " - make_interval(secs => $3) THEN now() ELSE s.created_at END,"
                    " summary = CASE WHEN s.deleted OR s.updated_at < now()"
                    " - make_interval(secs => $3) THEN '' ELSE s.summary END,"
                    " summary_through_turn = CASE WHEN s.deleted OR s.updated_at < now()"
                    " - make_interval(secs => $3) THEN 0 ELSE s.summary_through_turn END,"
                    " deleted = false, updated_at = now()",
                    tenant_id,
                    session_id,
                    rules.ttl_seconds,
                )
                running, turns = await conn.fetchrow(
                    f"SELECT count(*) FILTER (WHERE status = $3), count(*) FROM runs"
                    f" WHERE {_TURNS}",
                    tenant_id,
                    session_id,
                    RUNNING,
                )
                if running:
                    raise session_rows.session_busy(session_id)
                if turns >= rules.max_turns:
                    raise session_rows.session_full(session_id, rules.max_turns)
                await self._insert_run(
                    conn, run_id, tenant_id, request, trace_id, span_id, session_id
                )

        retried = _Retried()
        try:
            await self._pool.run(block, on_retry=retried)
        except asyncpg.UniqueViolationError:
            if await self._committed_before(retried, run_id, trace_id):
                return
            raise run_exists(run_id) from None
        except FailedPrecondition:
            if await self._committed_before(retried, run_id, trace_id):
                return  # the first try committed: the running turn is this one
            raise

    async def _fenced(self, run_id: str, sql: str, *args: object) -> None:
        """Run a write of ``run_id``'s state that only its owner may make, committed
        with the other writes queued meanwhile (``trellis.runtime.coalescing``)."""
        await self._writes.send(_Write(run_id, sql, args))

    async def _commit_many(self, writes: Sequence[_Write]) -> list[BaseException | None]:
        """``writes`` in one transaction, in order: None for each one committed, or
        LeaseLost for one this owner may no longer make (the others still commit).
        A statement that fails aborts the transaction: then each write runs alone, so
        only its own caller gets its error."""
        if len(writes) == 1:
            return [await _error_of(self._fenced_alone(writes[0]))]
        retried = _Retried()

        runs = sorted({w.run_id for w in writes})

        async def apply(conn: asyncpg.Connection) -> list[str]:
            async with conn.transaction():
                if len(runs) > 1:  # rows of runs locked in run_id order, as renew does
                    await conn.execute(_LOCK_RUNS, runs)
                return [await conn.execute(w.sql, w.run_id, self.owner, *w.args) for w in writes]

        try:
            statuses = await self._pool.run(apply, on_retry=retried)
        except asyncpg.PostgresError:
            return [await _error_of(self._fenced_alone(w, retried.yes)) for w in writes]
        return [
            lease_lost(w.run_id) if _count(status) == 0 else None
            for w, status in zip(writes, statuses, strict=True)
        ]

    async def _fenced_alone(self, write: _Write, retried_before: bool = False) -> None:
        """One write in a transaction of its own."""
        retried = _Retried()
        retried.yes = retried_before
        try:
            status = await self._pool.run(
                lambda conn: conn.execute(write.sql, write.run_id, self.owner, *write.args),
                on_retry=retried,
            )
        except asyncpg.UniqueViolationError:
            if retried.yes:  # the nodes' first try committed before its connection dropped
                return
            raise
        if _count(status) == 0:
            raise lease_lost(write.run_id)

    async def add_nodes(
        self, run_id: str, first_seq: int, calls: Sequence[common_pb2.ToolCall]
    ) -> None:
        await self._fenced(
            run_id,
            "INSERT INTO run_nodes (run_id, node_id, seq, call) SELECT $1::text, node_id,"
            " seq, call FROM unnest($3::text[], $4::int[], $5::bytea[]) AS n(node_id, seq, call)"
            f" WHERE {_OWNED}",
            [call.node_id for call in calls],
            list(range(first_seq, first_seq + len(calls))),
            [call.SerializeToString() for call in calls],
        )

    async def set_outcome(self, run_id: str, outcome: common_pb2.NodeOutcome) -> None:
        await self._fenced(
            run_id,
            "UPDATE run_nodes SET outcome = $4, status = $5"
            f" WHERE run_id = $1 AND node_id = $3 AND {_OWNED}",
            outcome.node_id,
            outcome.SerializeToString(),
            outcome.status,
        )

    async def save_progress(self, run_id: str, progress: Progress) -> None:
        await self._fenced(
            run_id,
            "UPDATE runs SET progress = $3 WHERE run_id = $1 AND owner = $2",
            progress.to_json(),
        )

    async def finish(self, run_id: str, finished: executor_pb2.RunFinished) -> None:
        await self._fenced(
            run_id,
            "UPDATE runs SET status = $3, finished = $4, finished_at = now()"
            " WHERE run_id = $1 AND owner = $2",
            finished.status,
            finished.SerializeToString(),
        )

    async def get(self, run_id: str) -> executor_pb2.Run | None:
        async def read(conn: asyncpg.Connection) -> tuple[Any, list[Any]]:
            row = await conn.fetchrow(
                "SELECT tenant_id, goal, status, trace_id, created_at, finished, finished_at,"
                " progress, session_id FROM runs WHERE run_id = $1",
                run_id,
            )
            if row is None:
                return None, []
            nodes = await conn.fetch(
                "SELECT call, outcome FROM run_nodes WHERE run_id = $1 ORDER BY seq", run_id
            )
            return row, nodes

        row, nodes = await self._pool.run(read)
        if row is None:
            return None
        run = build_run(
            run_id,
            row["tenant_id"],
            row["goal"],
            row["status"],
            row["trace_id"],
            row["created_at"],
            row["finished"],
            row["finished_at"],
            row["progress"],
            row["session_id"],
        )
        return add_nodes(run, [(n["call"], n["outcome"]) for n in nodes])

    async def list_runs(
        self, tenant_id: str, query: RunQuery, cursor: Cursor | None, limit: int
    ) -> list[tuple[executor_pb2.RunSummary, Cursor]]:
        params: list[object] = []

        def mark(value: object) -> str:
            params.append(value)
            return f"${len(params)}"

        where = query.where(tenant_id, cursor, mark, from_micros)
        sql = (
            f"SELECT {SUMMARY_COLUMNS} FROM runs WHERE {where}"
            f" ORDER BY created_at DESC, run_id DESC LIMIT {mark(limit)}"
        )

        async def read(conn: asyncpg.Connection) -> tuple[list[Any], list[Any]]:
            rows = await conn.fetch(sql, *params)
            counts = await conn.fetch(
                "SELECT run_id, status, count(*)::int FROM run_nodes"
                " WHERE run_id = ANY($1::text[]) GROUP BY run_id, status",
                [row["run_id"] for row in rows],
            )
            return rows, counts

        rows, counts = await self._pool.run(read)
        page = [
            (build_summary(*row), Cursor(to_micros(row["created_at"]), row["run_id"]))
            for row in rows
        ]
        add_node_counts({s.run_id: s for s, _ in page}, [tuple(row) for row in counts])
        return page

    async def load(self, run_id: str) -> Resumable | None:
        row = await self._pool.fetchrow(
            "SELECT request, progress, resumes, span_id FROM runs WHERE run_id = $1", run_id
        )
        return None if row is None else resumable(*row)

    async def renew(self, run_ids: Collection[str]) -> set[str]:
        if not run_ids:
            return set()
        rows = await self._pool.fetch(
            f"UPDATE runs SET lease_until = {_LEASE} WHERE run_id IN (SELECT run_id FROM runs"
            " WHERE run_id = ANY($3::text[]) AND owner = $1 ORDER BY run_id"
            " FOR NO KEY UPDATE) RETURNING run_id",
            self.owner,
            self._lease,
            list(run_ids),
        )
        return {row["run_id"] for row in rows}

    async def request_cancel(self, run_id: str) -> None:
        await self._pool.execute(
            "UPDATE runs SET cancel_requested = true WHERE run_id = $1 AND status = $2",
            run_id,
            RUNNING,
        )

    async def cancel_requested(self, run_ids: Collection[str]) -> set[str]:
        rows = await self._pool.fetch(
            "SELECT run_id FROM runs WHERE run_id = ANY($1::text[]) AND cancel_requested",
            list(run_ids),
        )
        return {row["run_id"] for row in rows}

    async def release(self, run_ids: Collection[str]) -> None:
        await self._pool.execute(
            "UPDATE runs SET lease_until = now() - interval '1 second' WHERE run_id IN"
            " (SELECT run_id FROM runs WHERE run_id = ANY($2::text[]) AND owner = $1"
            " AND status = $3 ORDER BY run_id FOR NO KEY UPDATE)",
            self.owner,
            list(run_ids),
            RUNNING,
        )

    async def claim(self, *, limit: int, run_id: str | None = None, own: bool = False) -> list[str]:
        # SKIP LOCKED: two replicas claiming at once each take different runs.
        rows = await self._pool.fetch(
            f"UPDATE runs SET owner = $1, lease_until = {_LEASE}, resumes = resumes + 1"
            " WHERE run_id IN (SELECT run_id FROM runs WHERE status = $3"
            " AND (lease_until < now() OR ($4 AND owner = $1))"
            " AND ($5::text IS NULL OR run_id = $5)"
            " ORDER BY created_at LIMIT $6 FOR UPDATE SKIP LOCKED)"
            " RETURNING run_id",
            self.owner,
            self._lease,
            RUNNING,
            own,
            run_id,
            limit,
        )
        return [row["run_id"] for row in rows]


async def _fill_node_status(conn: asyncpg.Connection) -> None:
    """Once per database: the status column of outcomes stored before it existed
    (replicas starting together may both do it: the same values either way)."""
    if await conn.fetchval("SELECT true FROM store_meta WHERE name = $1", NODE_STATUS_FILLED):
        return
    rows = await conn.fetch(
        "SELECT run_id, node_id, outcome FROM run_nodes WHERE status = 0 AND outcome IS NOT NULL"
    )
    await conn.executemany(
        "UPDATE run_nodes SET status = $1 WHERE run_id = $2 AND node_id = $3",
        [(outcome_status(row["outcome"]), row["run_id"], row["node_id"]) for row in rows],
    )
    await conn.execute(
        "INSERT INTO store_meta (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        NODE_STATUS_FILLED,
        b"1",
    )
