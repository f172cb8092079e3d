"""The SQLite run store: the embedded default.

One connection per process; the event loop serializes its writes, and WAL plus a
busy timeout (``trellis.runtime.sqlite.connect``) let several processes share a file.
Leases are in Unix seconds of the host clock: processes sharing a file share a host.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from datetime import UTC, datetime

import aiosqlite

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import sqlite
from trellis_executor.store.base import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_OWNER,
    Progress,
    Resumable,
    add_nodes,
    build_run,
    lease_lost,
    resumable,
    run_exists,
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
"""

#: Columns added after the first release, added to an older file when it is opened.
LEASE_COLUMNS = {
    "owner": "TEXT NOT NULL DEFAULT ''",
    "lease_until": "REAL NOT NULL DEFAULT 0",
    "progress": "TEXT",
    "span_id": "TEXT NOT NULL DEFAULT ''",
    "resumes": "INTEGER NOT NULL DEFAULT 0",
}

#: "this owner holds the run": the fence on every write of a run's state.
_OWNED = "EXISTS (SELECT 1 FROM runs r WHERE r.run_id = :run_id AND r.owner = :owner)"


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SqliteRunStore:
    """Async SQLite run store for one owner; each method commits before it returns."""

    def __init__(self, db: aiosqlite.Connection, owner: str, lease_seconds: float) -> None:
        self._db = db
        self.owner = owner
        self._lease = lease_seconds

    @classmethod
    async def open(
        cls, url: str, *, owner: str = DEFAULT_OWNER, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> SqliteRunStore:
        db = await sqlite.connect(url)
        await db.executescript(SCHEMA)
        async with db.execute("PRAGMA table_info(runs)") as cursor:
            present = {row[1] async for row in cursor}
        for name, declaration in LEASE_COLUMNS.items():
            if name not in present:
                await db.execute(f"ALTER TABLE runs ADD COLUMN {name} {declaration}")
        await db.commit()
        return cls(db, owner, lease_seconds)

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
    ) -> None:
        try:
            await self._db.execute(
                "INSERT INTO runs (run_id, owner, lease_until, tenant_id, goal, status, request,"
                " trace_id, span_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
            )
        except aiosqlite.IntegrityError:
            raise run_exists(run_id) from None
        await self._db.commit()

    async def _fenced(self, run_id: str, sql: str, **values: object) -> None:
        """Run a write of ``run_id``'s state that only its owner may make."""
        cursor = await self._db.execute(sql, {"run_id": run_id, "owner": self.owner, **values})
        await self._db.commit()
        if cursor.rowcount == 0:
            raise lease_lost(run_id)

    async def add_node(self, run_id: str, seq: int, call: common_pb2.ToolCall) -> None:
        await self._fenced(
            run_id,
            "INSERT INTO run_nodes (run_id, node_id, seq, call)"
            f" SELECT :run_id, :node_id, :seq, :call WHERE {_OWNED}",
            node_id=call.node_id,
            seq=seq,
            call=call.SerializeToString(),
        )

    async def set_outcome(self, run_id: str, outcome: common_pb2.NodeOutcome) -> None:
        await self._fenced(
            run_id,
            "UPDATE run_nodes SET outcome = :outcome"
            f" WHERE run_id = :run_id AND node_id = :node_id AND {_OWNED}",
            node_id=outcome.node_id,
            outcome=outcome.SerializeToString(),
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
        async with self._db.execute(
            "SELECT tenant_id, goal, status, trace_id, created_at, finished, finished_at"
            " FROM runs WHERE run_id = ?",
            (run_id,),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        tenant_id, goal, status, trace_id, created_at, finished_blob, finished_at = row
        run = build_run(
            run_id,
            tenant_id,
            goal,
            status,
            trace_id,
            datetime.fromisoformat(created_at),
            finished_blob,
            datetime.fromisoformat(finished_at) if finished_at else None,
        )
        async with self._db.execute(
            "SELECT call, outcome FROM run_nodes WHERE run_id = ? ORDER BY seq", (run_id,)
        ) as cursor:
            rows = [(call, outcome) async for call, outcome in cursor]
        return add_nodes(run, rows)

    async def load(self, run_id: str) -> Resumable | None:
        async with self._db.execute(
            "SELECT request, progress, resumes, span_id FROM runs WHERE run_id = ?", (run_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else resumable(*row)

    async def renew(self, run_ids: Collection[str]) -> set[str]:
        if not run_ids:
            return set()
        ids = list(run_ids)
        marks = ",".join("?" * len(ids))
        async with self._db.execute(
            f"UPDATE runs SET lease_until = ? WHERE run_id IN ({marks}) AND owner = ?"
            " AND status = ? RETURNING run_id",
            (self._lease_until(), *ids, self.owner, RUNNING),
        ) as cursor:
            held = {row[0] async for row in cursor}
        await self._db.commit()
        return held

    async def release(self, run_ids: Collection[str]) -> None:
        ids = list(run_ids)
        marks = ",".join("?" * len(ids))
        await self._db.execute(
            f"UPDATE runs SET lease_until = 0 WHERE run_id IN ({marks}) AND owner = ?"
            " AND status = ?",
            (*ids, self.owner, RUNNING),
        )
        await self._db.commit()

    async def claim(self, *, limit: int, run_id: str | None = None, own: bool = False) -> list[str]:
        async with self._db.execute(
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
        ) as cursor:
            claimed = [row[0] async for row in cursor]
        await self._db.commit()
        return claimed
