"""The SQLite run store: the embedded default.

One connection per process; the event loop serializes its writes, and WAL plus a
busy timeout (``trellis.runtime.sqlite.connect``) let several processes share a file.
"""

from __future__ import annotations

from datetime import UTC, datetime

import aiosqlite

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import sqlite
from trellis_executor.store.base import add_nodes, build_run, run_exists

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


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SqliteRunStore:
    """Async SQLite run store; each method commits before it returns."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, url: str) -> SqliteRunStore:
        db = await sqlite.connect(url)
        await db.executescript(SCHEMA)
        await db.commit()
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def create(
        self, run_id: str, tenant_id: str, request: executor_pb2.RunRequest, trace_id: str
    ) -> None:
        try:
            await self._db.execute(
                "INSERT INTO runs (run_id, tenant_id, goal, status, request, trace_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    tenant_id,
                    request.goal,
                    executor_pb2.RUN_STATUS_RUNNING,
                    request.SerializeToString(),
                    trace_id,
                    _now(),
                ),
            )
        except aiosqlite.IntegrityError:
            raise run_exists(run_id) from None
        await self._db.commit()

    async def add_node(self, run_id: str, seq: int, call: common_pb2.ToolCall) -> None:
        await self._db.execute(
            "INSERT INTO run_nodes (run_id, node_id, seq, call) VALUES (?, ?, ?, ?)",
            (run_id, call.node_id, seq, call.SerializeToString()),
        )
        await self._db.commit()

    async def set_outcome(self, run_id: str, outcome: common_pb2.NodeOutcome) -> None:
        await self._db.execute(
            "UPDATE run_nodes SET outcome = ? WHERE run_id = ? AND node_id = ?",
            (outcome.SerializeToString(), run_id, outcome.node_id),
        )
        await self._db.commit()

    async def finish(self, run_id: str, finished: executor_pb2.RunFinished) -> None:
        await self._db.execute(
            "UPDATE runs SET status = ?, finished = ?, finished_at = ? WHERE run_id = ?",
            (finished.status, finished.SerializeToString(), _now(), run_id),
        )
        await self._db.commit()

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
