"""The SQLite run store: the embedded default.

One connection per process in autocommit mode: every write is one statement, so it
is durable when its ``execute`` returns. WAL plus a busy timeout
(``trellis.runtime.sqlite.connect``) let several processes share a file. Leases are
in Unix seconds of the host clock: processes sharing a file share a host. Creation
times are ISO 8601 text in UTC (``datetime.isoformat``), which sorts as the times do.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime

import aiosqlite

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import sqlite
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

RUNNING = executor_pb2.RUN_STATUS_RUNNING

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


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SqliteRunStore:
    """Async SQLite run store for one owner; each write is committed when it returns."""

    def __init__(
        self, db: aiosqlite.Connection, owner: str, lease_seconds: float, page_token_key: bytes
    ) -> None:
        self._db = db
        self.owner = owner
        self._lease = lease_seconds
        self.page_token_key = page_token_key

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
    ) -> None:
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

    async def _fenced(self, run_id: str, sql: str, **values: object) -> None:
        """Run a write of ``run_id``'s state that only its owner may make."""
        cursor = await self._db.execute(sql, {"run_id": run_id, "owner": self.owner, **values})
        if cursor.rowcount == 0:
            raise lease_lost(run_id)

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
            " progress FROM runs WHERE run_id = ?",
            (run_id,),
        )
        if not rows:
            return None
        row = next(iter(rows))
        tenant_id, goal, status, trace_id, created_at, finished_blob, finished_at, progress = row
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
