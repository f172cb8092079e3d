"""The PostgreSQL run store's sessions: a session's row and its turns (the runs since it
(re)started), listing, summaries and deletion. ``PostgresRunStore`` holds these with the
rest of the store; admitting a turn is part of its ``create``."""

from __future__ import annotations

from typing import Any

import asyncpg

from trellis.executor.v1 import executor_pb2
from trellis.runtime.postgres import ReconnectingPool
from trellis_executor.store import sessions as session_rows
from trellis_executor.store.base import (
    add_nodes,
    build_run,
    from_micros,
    session_page,
)

RUNNING = executor_pb2.RUN_STATUS_RUNNING

#: A session still alive ($3: its time to live in seconds).
LIVE = "updated_at >= now() - make_interval(secs => $3)"


class PostgresSessions:
    """The session queries of ``PostgresRunStore`` (over its pool)."""

    _pool: ReconnectingPool

    async def _session_record(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, ttl_seconds: float
    ) -> session_rows.SessionRecord | None:
        row = await conn.fetchrow(
            "SELECT summary, summary_through_turn, created_at, updated_at, deleted FROM sessions"
            f" WHERE tenant_id = $1 AND session_id = $2 AND {LIVE}",
            tenant_id,
            session_id,
            ttl_seconds,
        )
        return None if row is None else session_rows.SessionRecord(tenant_id, session_id, *row)

    @staticmethod
    async def _turns(
        conn: asyncpg.Connection, tenant_id: str, session_ids: list[str], nodes: bool
    ) -> dict[str, list[executor_pb2.Run]]:
        found = await conn.fetch(
            "SELECT r.run_id, r.goal, r.status, r.trace_id, r.created_at, r.finished,"
            " r.finished_at, r.progress, r.session_id FROM runs r JOIN sessions s"
            " ON s.tenant_id = r.tenant_id AND s.session_id = r.session_id"
            " WHERE r.tenant_id = $1 AND r.session_id = ANY($2::text[])"
            " AND r.created_at >= s.created_at ORDER BY r.created_at, r.run_id",
            tenant_id,
            session_ids,
        )
        out: dict[str, list[executor_pb2.Run]] = {sid: [] for sid in session_ids}
        by_id: dict[str, executor_pb2.Run] = {}
        for row in found:
            run = build_run(row["run_id"], tenant_id, *list(row.values())[1:])
            out[row["session_id"]].append(run)
            by_id[row["run_id"]] = run
        if nodes and by_id:
            node_rows = await conn.fetch(
                "SELECT run_id, call, outcome FROM run_nodes WHERE run_id = ANY($1::text[])"
                " ORDER BY run_id, seq",
                list(by_id),
            )
            for n in node_rows:
                add_nodes(by_id[n["run_id"]], [(n["call"], n["outcome"])])
        return out

    async def get_session(
        self, tenant_id: str, session_id: str, ttl_seconds: float
    ) -> tuple[session_rows.SessionRecord, list[executor_pb2.Run]] | None:
        async def read(conn: asyncpg.Connection) -> Any:
            record = await self._session_record(conn, tenant_id, session_id, ttl_seconds)
            if record is None:
                return None
            turns = await self._turns(conn, tenant_id, [session_id], nodes=True)
            return record, turns[session_id]

        return await self._pool.run(read)

    async def list_sessions(
        self,
        tenant_id: str,
        ttl_seconds: float,
        cursor: session_rows.SessionCursor | None,
        limit: int,
    ) -> list[tuple[executor_pb2.SessionSummary, session_rows.SessionCursor]]:
        async def read(conn: asyncpg.Connection) -> Any:
            args: list[object] = [tenant_id, limit, ttl_seconds]
            after = ""
            if cursor is not None:
                args += [from_micros(cursor.updated_us), cursor.session_id]
                after = " AND (updated_at < $4 OR (updated_at = $4 AND session_id < $5))"
            found = await conn.fetch(
                "SELECT session_id, summary, summary_through_turn, created_at, updated_at,"
                f" deleted FROM sessions WHERE tenant_id = $1 AND {LIVE}{after}"
                " ORDER BY updated_at DESC, session_id DESC LIMIT $2",
                *args,
            )
            records = [session_rows.SessionRecord(tenant_id, *row) for row in found]
            turns = await self._turns(conn, tenant_id, [r.session_id for r in records], nodes=False)
            return records, turns

        records, turns = await self._pool.run(read)
        return session_page(records, turns)

    async def save_summary(
        self, tenant_id: str, session_id: str, summary: str, through_turn: int
    ) -> None:
        await self._pool.execute(
            "UPDATE sessions SET summary = $3, summary_through_turn = $4"
            " WHERE tenant_id = $1 AND session_id = $2 AND summary_through_turn < $4"
            " AND NOT deleted",
            tenant_id,
            session_id,
            summary,
            through_turn,
        )

    async def delete_session(self, tenant_id: str, session_id: str, ttl_seconds: float) -> int:
        """One transaction under the session row's lock: no turn starts meanwhile."""

        async def block(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                locked = await conn.fetchval(
                    f"SELECT true FROM sessions WHERE tenant_id = $1 AND session_id = $2"
                    f" AND {LIVE} FOR UPDATE",
                    tenant_id,
                    session_id,
                    ttl_seconds,
                )
                if not locked:
                    raise session_rows.session_not_found(session_id)
                turns = (await self._turns(conn, tenant_id, [session_id], nodes=False))[session_id]
                if any(run.status == RUNNING for run in turns):
                    raise session_rows.session_busy(session_id)
                ids = [run.run_id for run in turns]
                for run_id, request, finished in await conn.fetch(
                    "SELECT run_id, request, finished FROM runs WHERE run_id = ANY($1::text[])",
                    ids,
                ):
                    await conn.execute(
                        "UPDATE runs SET goal = '', request = $2, finished = $3 WHERE run_id = $1",
                        run_id,
                        session_rows.erased_request(request),
                        session_rows.erased_finished(finished),
                    )
                nodes = await conn.fetch(
                    "SELECT run_id, node_id, call, outcome FROM run_nodes"
                    " WHERE run_id = ANY($1::text[])",
                    ids,
                )
                await conn.executemany(
                    "UPDATE run_nodes SET call = $3, outcome = $4"
                    " WHERE run_id = $1 AND node_id = $2",
                    [
                        (
                            n["run_id"],
                            n["node_id"],
                            session_rows.erased_call(n["call"]),
                            session_rows.erased_outcome(n["outcome"]),
                        )
                        for n in nodes
                    ],
                )
                await conn.execute(
                    "UPDATE sessions SET deleted = true, summary = '', summary_through_turn = 0"
                    " WHERE tenant_id = $1 AND session_id = $2",
                    tenant_id,
                    session_id,
                )
                return len(turns)

        return await self._pool.run(block)
