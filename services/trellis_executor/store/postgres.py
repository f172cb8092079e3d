"""The PostgreSQL run store: what several executor replicas share.

asyncpg with a connection pool; every statement runs in autocommit (or in an explicit
transaction that ends inside the method), so a write is durable when the method
returns, the same promise the SQLite store makes. Timestamps are TIMESTAMPTZ and
protobuf blobs BYTEA; otherwise the schema is the SQLite one.
"""

from __future__ import annotations

import asyncpg

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis_executor.store.base import add_nodes, build_run, run_exists

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
"""

#: Serializes schema creation: two replicas starting together would otherwise race
#: on CREATE TABLE IF NOT EXISTS (it is not atomic in PostgreSQL).
_SCHEMA_LOCK = 0x7472656C6C6973  # "trellis"


class PostgresRunStore:
    """Async PostgreSQL run store over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 10) -> PostgresRunStore:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await conn.execute(SCHEMA)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def create(
        self, run_id: str, tenant_id: str, request: executor_pb2.RunRequest, trace_id: str
    ) -> None:
        try:
            await self._pool.execute(
                "INSERT INTO runs (run_id, tenant_id, goal, status, request, trace_id)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                run_id,
                tenant_id,
                request.goal,
                executor_pb2.RUN_STATUS_RUNNING,
                request.SerializeToString(),
                trace_id,
            )
        except asyncpg.UniqueViolationError:
            raise run_exists(run_id) from None

    async def add_node(self, run_id: str, seq: int, call: common_pb2.ToolCall) -> None:
        await self._pool.execute(
            "INSERT INTO run_nodes (run_id, node_id, seq, call) VALUES ($1, $2, $3, $4)",
            run_id,
            call.node_id,
            seq,
            call.SerializeToString(),
        )

    async def set_outcome(self, run_id: str, outcome: common_pb2.NodeOutcome) -> None:
        await self._pool.execute(
            "UPDATE run_nodes SET outcome = $1 WHERE run_id = $2 AND node_id = $3",
            outcome.SerializeToString(),
            run_id,
            outcome.node_id,
        )

    async def finish(self, run_id: str, finished: executor_pb2.RunFinished) -> None:
        await self._pool.execute(
            "UPDATE runs SET status = $1, finished = $2, finished_at = now() WHERE run_id = $3",
            finished.status,
            finished.SerializeToString(),
            run_id,
        )

    async def get(self, run_id: str) -> executor_pb2.Run | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT tenant_id, goal, status, trace_id, created_at, finished, finished_at"
                " FROM runs WHERE run_id = $1",
                run_id,
            )
            if row is None:
                return None
            nodes = await conn.fetch(
                "SELECT call, outcome FROM run_nodes WHERE run_id = $1 ORDER BY seq", run_id
            )
        run = build_run(
            run_id,
            row["tenant_id"],
            row["goal"],
            row["status"],
            row["trace_id"],
            row["created_at"],
            row["finished"],
            row["finished_at"],
        )
        return add_nodes(run, [(n["call"], n["outcome"]) for n in nodes])
