"""The SQLite run store: the embedded default.

One connection per process in autocommit mode: a write alone is one statement; a run's
state writes that queue while one commits go together in one transaction (group commit),
each durable when its caller returns. WAL plus a busy timeout
(``trellis.runtime.sqlite.connect``) let several processes share a file. Leases are in
Unix seconds of the host clock: processes sharing a file share a host. Creation times are
ISO 8601 text in UTC (``datetime.isoformat``), which sorts as the times do. The session
queries are in ``sqlite_sessions``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiosqlite

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import sqlite
from trellis.runtime.coalescing import Coalescer
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
from trellis_executor.store.sqlite_sessions import (
    RUNNING,
    TURNS,
    SqliteSessions,
    expired_before,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    goal TEXT NOT NULL,
    status INTEGER NOT NULL,
    request BLOB NOT NULL,
    trace_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    finished BLOB,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS run_nodes (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    call BLOB NOT NULL,
    outcome BLOB,
    PRIMARY KEY (run_id, node_id)
);
CREATE TABLE IF NOT EXISTS store_meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    summary_through_turn INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, session_id)
);
CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (tenant_id, updated_at, session_id);
"""

#: Columns added after the first release, added to an older file when it is opened.
ADDED_COLUMNS = {
    "runs": {
        "owner": "TEXT NOT NULL DEFAULT ''",
        "lease_until": "REAL NOT NULL DEFAULT 0",
        "progress": "TEXT",
        "span_id": "TEXT NOT NULL DEFAULT ''",
        "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
        "resumes": "INTEGER NOT NULL DEFAULT 0",
        "session_id": "TEXT NOT NULL DEFAULT ''",
    },
    # The outcome's NodeStatus (0: no outcome yet), for a list's node counts.
    "run_nodes": {"status": "INTEGER NOT NULL DEFAULT 0"},
}

#: ListRuns' indexes, one per way of filtering a tenant's runs (newest first).
INDEXES = """
CREATE INDEX IF NOT EXISTS runs_by_tenant ON runs (tenant_id, created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_by_tenant_status ON runs (tenant_id, status, created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_by_tenant_session
    ON runs (tenant_id, session_id, created_at, run_id) WHERE session_id <> '';
"""

#: "this owner holds the run": the fence on every write of a run's state.
_OWNED = "EXISTS (SELECT 1 FROM runs r WHERE r.run_id = :run_id AND r.owner = :owner)"
#: Most state writes committed in one transaction (one thread hop, one WAL commit).
MAX_GROUP = 256


@dataclass(frozen=True)
class _Write:
    """A fenced write of one run's state: ``sql`` with its named ``params``."""

    run_id: str
    sql: str
    params: Mapping[str, object]


def _commit_group(conn: sqlite3.Connection, writes: Sequence[_Write]) -> list[Exception | None]:
    """``writes`` in one transaction, in order (in aiosqlite's thread): None for each
    committed, ``LeaseLost`` for one this owner may no longer make, or the error of a
    statement that failed (SQLite undoes that statement only; the others commit)."""
    results: list[Exception | None] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for write in writes:
            try:
                cursor = conn.execute(write.sql, write.params)
            except sqlite3.Error as error:
                results.append(error)
                continue
            results.append(None if cursor.rowcount else lease_lost(write.run_id))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SqliteRunStore(SqliteSessions):
    """Async SQLite run store for one owner; each write is committed when it returns.

    A run's state writes queued while others commit go together in the next transaction
    (``trellis.runtime.coalescing``), as on PostgreSQL: under load one thread hop and one
    WAL commit serve many writes.
    """

    def __init__(
        self, db: aiosqlite.Connection, owner: str, lease_seconds: float, page_token_key: bytes
    ) -> None:
        self._db = db
        self.owner = owner
        self._lease = lease_seconds
        self.page_token_key = page_token_key
        self._writes: Coalescer[_Write, None] = Coalescer(
            self._commit_many, max_group=MAX_GROUP, name="store-group-commit"
        )

    @classmethod
    async def open(
        cls, url: str, *, owner: str = DEFAULT_OWNER, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> SqliteRunStore:
        db = await sqlite.connect(url, autocommit=True)
        await db.executescript(SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    await db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
        await db.executescript(INDEXES)
        await _fill_node_status(db)
        await db.execute(
            "INSERT OR IGNORE INTO store_meta (name, value) VALUES (?, ?)",
            (PAGE_TOKEN_KEY, new_page_token_key()),
        )
        [(key,)] = await db.execute_fetchall(
            "SELECT value FROM store_meta WHERE name = ?", (PAGE_TOKEN_KEY,)
        )
        return cls(db, owner, lease_seconds, bytes(key))

    async def close(self) -> None:
        await self._writes.aclose()
        await self._db.close()

    def _lease_until(self) -> float:
        return time.time() + self._lease

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
        try:
            await self._db.execute(
                "INSERT INTO runs (run_id, owner, lease_until, tenant_id, goal, status, request,"
                " trace_id, span_id, created_at, session_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    self.owner,
                    self._lease_until(),
                    tenant_id,
                    request.goal,
                    RUNNING,
                    request.SerializeToString(),
                    trace_id,
                    span_id,
                    _now(),
                    session_id,
                ),
            )
        except aiosqlite.IntegrityError:
            raise run_exists(run_id) from None

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
        """The session's row (started again when it expired or was deleted), then the
        run, in one statement that checks the session is idle and not full: SQLite
        runs each statement alone, across processes too."""
        now = _now()
        await self._db.execute(
            "INSERT INTO sessions (tenant_id, session_id, created_at, updated_at)"
            " VALUES (:tenant, :session, :now, :now) ON CONFLICT (tenant_id, session_id)"
            " DO UPDATE SET"
            " created_at = CASE WHEN deleted OR updated_at < :expired THEN :now"
            " ELSE created_at END,"
            " summary = CASE WHEN deleted OR updated_at < :expired THEN '' ELSE summary END,"
            " summary_through_turn = CASE WHEN deleted OR updated_at < :expired THEN 0"
            " ELSE summary_through_turn END,"
            " deleted = 0, updated_at = :now",
            {
                "tenant": tenant_id,
                "session": session_id,
                "now": now,
                "expired": expired_before(rules.ttl_seconds),
            },
        )
        params = {
            "run_id": run_id,
            "owner": self.owner,
            "lease": self._lease_until(),
            "tenant": tenant_id,
            "goal": request.goal,
            "running": RUNNING,
            "request": request.SerializeToString(),
            "trace_id": trace_id,
            "span_id": span_id,
            "now": now,
            "session": session_id,
            "max_turns": rules.max_turns,
        }
        try:
            cursor = await self._db.execute(
                "INSERT INTO runs (run_id, owner, lease_until, tenant_id, goal, status, request,"
                " trace_id, span_id, created_at, session_id) SELECT :run_id, :owner, :lease,"
                " :tenant, :goal, :running, :request, :trace_id, :span_id, :now, :session"
                f" WHERE NOT EXISTS (SELECT 1 FROM runs WHERE {TURNS} AND status = :running)"
                f" AND (SELECT count(*) FROM runs WHERE {TURNS}) < :max_turns",
                params,
            )
        except aiosqlite.IntegrityError:
            raise run_exists(run_id) from None
        if cursor.rowcount == 1:
            return
        busy = await self._db.execute_fetchall(
            f"SELECT 1 FROM runs WHERE {TURNS} AND status = :running", params
        )
        if busy:
            raise session_rows.session_busy(session_id)
        raise session_rows.session_full(session_id, rules.max_turns)

    async def _fenced(self, run_id: str, sql: str, **values: object) -> None:
        """Run a write of ``run_id``'s state that only its owner may make, committed
        with the other writes queued meanwhile."""
        await self._writes.send(
            _Write(run_id, sql, {"run_id": run_id, "owner": self.owner, **values})
        )

    async def _commit_many(self, writes: Sequence[_Write]) -> list[Exception | None]:
        if len(writes) == 1:  # one statement commits itself: no transaction to open
            write = writes[0]
            try:
                cursor = await self._db.execute(write.sql, write.params)
            except sqlite3.Error as error:
                return [error]
            return [None if cursor.rowcount else lease_lost(write.run_id)]
        # aiosqlite's own way to run a function in its thread (private, but the only
        # one that runs several statements in a single hop)
        return await self._db._execute(_commit_group, self._db._conn, writes)  # type: ignore[attr-defined]

    async def add_nodes(
        self, run_id: str, first_seq: int, calls: Sequence[common_pb2.ToolCall]
    ) -> None:
        values = ",".join(f"(:node_id_{i}, :seq_{i}, :call_{i})" for i in range(len(calls)))
        params: dict[str, object] = {}
        for i, call in enumerate(calls):
            params |= {
                f"node_id_{i}": call.node_id,
                f"seq_{i}": first_seq + i,
                f"call_{i}": call.SerializeToString(),
            }
        await self._fenced(
            run_id,
            "INSERT INTO run_nodes (run_id, node_id, seq, call) SELECT :run_id, column1,"
            f" column2, column3 FROM (VALUES {values}) WHERE {_OWNED}",
            **params,
        )

    async def set_outcome(self, run_id: str, outcome: common_pb2.NodeOutcome) -> None:
        await self._fenced(
            run_id,
            "UPDATE run_nodes SET outcome = :outcome, status = :status"
            f" WHERE run_id = :run_id AND node_id = :node_id AND {_OWNED}",
            node_id=outcome.node_id,
            outcome=outcome.SerializeToString(),
            status=outcome.status,
        )

    async def save_progress(self, run_id: str, progress: Progress) -> None:
        await self._fenced(
            run_id,
            "UPDATE runs SET progress = :progress WHERE run_id = :run_id AND owner = :owner",
            progress=progress.to_json(),
        )

    async def finish(self, run_id: str, finished: executor_pb2.RunFinished) -> None:
        await self._fenced(
            run_id,
            "UPDATE runs SET status = :status, finished = :finished, finished_at = :at"
            " WHERE run_id = :run_id AND owner = :owner",
            status=finished.status,
            finished=finished.SerializeToString(),
            at=_now(),
        )

    async def get(self, run_id: str) -> executor_pb2.Run | None:
        rows = await self._db.execute_fetchall(
            "SELECT tenant_id, goal, status, trace_id, created_at, finished, finished_at,"
            " progress, session_id FROM runs WHERE run_id = ?",
            (run_id,),
        )
        if not rows:
            return None
        row = next(iter(rows))
        tenant_id, goal, status, trace_id, created_at, finished_blob, finished_at = row[:7]
        progress, session_id = row[7:]
        run = build_run(
            run_id,
            tenant_id,
            goal,
            status,
            trace_id,
            datetime.fromisoformat(created_at),
            finished_blob,
            datetime.fromisoformat(finished_at) if finished_at else None,
            progress,
            session_id,
        )
        nodes = await self._db.execute_fetchall(
            "SELECT call, outcome FROM run_nodes WHERE run_id = ? ORDER BY seq", (run_id,)
        )
        return add_nodes(run, [(call, outcome) for call, outcome in nodes])

    async def list_runs(
        self, tenant_id: str, query: RunQuery, cursor: Cursor | None, limit: int
    ) -> list[tuple[executor_pb2.RunSummary, Cursor]]:
        params: list[object] = []

        def mark(value: object) -> str:
            params.append(value)
            return "?"

        where = query.where(tenant_id, cursor, mark, lambda us: from_micros(us).isoformat())
        rows = await self._db.execute_fetchall(
            f"SELECT {SUMMARY_COLUMNS} FROM runs WHERE {where}"
            " ORDER BY created_at DESC, run_id DESC LIMIT ?",
            (*params, limit),
        )
        page: list[tuple[executor_pb2.RunSummary, Cursor]] = []
        for run_id, goal, cut, status, trace_id, created, blob, finished, session in rows:
            created_at = datetime.fromisoformat(created)
            summary = build_summary(
                run_id,
                goal,
                cut,
                status,
                trace_id,
                created_at,
                blob,
                datetime.fromisoformat(finished) if finished else None,
                session,
            )
            page.append((summary, Cursor(to_micros(created_at), run_id)))
        if page:
            ids = [summary.run_id for summary, _ in page]
            counts = await self._db.execute_fetchall(
                f"SELECT run_id, status, count(*) FROM run_nodes WHERE run_id IN"
                f" ({','.join('?' * len(ids))}) GROUP BY run_id, status",
                ids,
            )
            add_node_counts({s.run_id: s for s, _ in page}, [tuple(row) for row in counts])
        return page

    async def load(self, run_id: str) -> Resumable | None:
        rows = await self._db.execute_fetchall(
            "SELECT request, progress, resumes, span_id FROM runs WHERE run_id = ?", (run_id,)
        )
        return next((resumable(*row) for row in rows), None)

    async def renew(self, run_ids: Collection[str]) -> set[str]:
        if not run_ids:
            return set()
        ids = list(run_ids)
        marks = ",".join("?" * len(ids))
        # execute_fetchall: the RETURNING statement completes in one step on the
        # shared connection, before any other statement runs on it.
        rows = await self._db.execute_fetchall(
            f"UPDATE runs SET lease_until = ? WHERE run_id IN ({marks}) AND owner = ?"
            " RETURNING run_id",
            (self._lease_until(), *ids, self.owner),
        )
        return {row[0] for row in rows}

    async def request_cancel(self, run_id: str) -> None:
        await self._db.execute(
            "UPDATE runs SET cancel_requested = 1 WHERE run_id = ? AND status = ?",
            (run_id, RUNNING),
        )

    async def cancel_requested(self, run_ids: Collection[str]) -> set[str]:
        ids = list(run_ids)
        marks = ",".join("?" * len(ids))
        rows = await self._db.execute_fetchall(
            f"SELECT run_id FROM runs WHERE run_id IN ({marks}) AND cancel_requested", ids
        )
        return {row[0] for row in rows}

    async def release(self, run_ids: Collection[str]) -> None:
        ids = list(run_ids)
        marks = ",".join("?" * len(ids))
        await self._db.execute(
            f"UPDATE runs SET lease_until = 0 WHERE run_id IN ({marks}) AND owner = ?"
            " AND status = ?",
            (*ids, self.owner, RUNNING),
        )

    async def claim(self, *, limit: int, run_id: str | None = None, own: bool = False) -> list[str]:
        rows = await self._db.execute_fetchall(
            "UPDATE runs SET owner = :owner, lease_until = :until, resumes = resumes + 1"
            " WHERE run_id IN (SELECT run_id FROM runs WHERE status = :running"
            " AND (lease_until < :now OR (:own AND owner = :owner))"
            " AND (:run_id IS NULL OR run_id = :run_id)"
            " ORDER BY created_at LIMIT :limit) RETURNING run_id",
            {
                "owner": self.owner,
                "until": self._lease_until(),
                "running": RUNNING,
                "now": time.time(),
                "own": own,
                "run_id": run_id,
                "limit": limit,
            },
        )
        return [row[0] for row in rows]


async def _fill_node_status(db: aiosqlite.Connection) -> None:
    """Once per file: the status column of outcomes stored before it existed."""
    done = await db.execute_fetchall(
        "SELECT 1 FROM store_meta WHERE name = ?", (NODE_STATUS_FILLED,)
    )
    if done:
        return
    rows = await db.execute_fetchall(
        "SELECT run_id, node_id, outcome FROM run_nodes WHERE status = 0 AND outcome IS NOT NULL"
    )
    await db.executemany(
        "UPDATE run_nodes SET status = ? WHERE run_id = ? AND node_id = ?",
        [(outcome_status(blob), run_id, node_id) for run_id, node_id, blob in rows],
    )
    await db.execute(
        "INSERT OR IGNORE INTO store_meta (name, value) VALUES (?, ?)", (NODE_STATUS_FILLED, b"1")
    )
