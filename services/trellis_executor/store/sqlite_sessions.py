"""The SQLite run store's sessions: a session's row and its turns (the runs since it
(re)started), listing, summaries and deletion. ``SqliteRunStore`` holds these with the
rest of the store; admitting a turn is part of its ``create``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import aiosqlite

from trellis.executor.v1 import executor_pb2
from trellis_executor.store import sessions as session_rows
from trellis_executor.store.base import (
    add_nodes,
    build_run,
    from_micros,
    session_page,
)

RUNNING = executor_pb2.RUN_STATUS_RUNNING

#: A session's turns: its runs since it (re)started.
TURNS = (
    "tenant_id = :tenant AND session_id = :session AND created_at >= (SELECT created_at"
    " FROM sessions WHERE tenant_id = :tenant AND session_id = :session)"
)


def expired_before(ttl_seconds: float) -> str:
    """Last activity before this (ISO text, as stored) means the session expired."""
    return (datetime.now(UTC) - timedelta(seconds=ttl_seconds)).isoformat()


def _record(
    tenant_id: str,
    session_id: str,
    summary: str,
    through_turn: int,
    created: str,
    updated: str,
    deleted: int,
) -> session_rows.SessionRecord:
    """A session's row as SQLite keeps it (ISO 8601 text times, a 0/1 flag)."""
    return session_rows.SessionRecord(
        tenant_id,
        session_id,
        summary,
        through_turn,
        datetime.fromisoformat(created),
        datetime.fromisoformat(updated),
        bool(deleted),
    )


class SqliteSessions:
    """The session queries of ``SqliteRunStore`` (over its connection)."""

    _db: aiosqlite.Connection

    async def _session_record(
        self, tenant_id: str, session_id: str, ttl_seconds: float
    ) -> session_rows.SessionRecord | None:
        found = await self._db.execute_fetchall(
            "SELECT summary, summary_through_turn, created_at, updated_at, deleted FROM sessions"
            " WHERE tenant_id = ? AND session_id = ? AND updated_at >= ?",
            (tenant_id, session_id, expired_before(ttl_seconds)),
        )
        for row in found:
            return _record(tenant_id, session_id, *row)
        return None

    async def _turns(
        self, tenant_id: str, session_ids: Sequence[str], nodes: bool
    ) -> dict[str, list[executor_pb2.Run]]:
        """The turns of each session (oldest first); with their nodes when ``nodes``."""
        marks = ",".join("?" * len(session_ids))
        found = await self._db.execute_fetchall(
            "SELECT r.run_id, r.goal, r.status, r.trace_id, r.created_at, r.finished,"
            " r.finished_at, r.progress, r.session_id FROM runs r JOIN sessions s"
            " ON s.tenant_id = r.tenant_id AND s.session_id = r.session_id"
            f" WHERE r.tenant_id = ? AND r.session_id IN ({marks})"
            " AND r.created_at >= s.created_at ORDER BY r.created_at, r.run_id",
            (tenant_id, *session_ids),
        )
        out: dict[str, list[executor_pb2.Run]] = {sid: [] for sid in session_ids}
        by_id: dict[str, executor_pb2.Run] = {}
        for run_id, goal, status, trace, created, blob, finished, progress, sid in found:
            run = build_run(
                run_id,
                tenant_id,
                goal,
                status,
                trace,
                datetime.fromisoformat(created),
                blob,
                datetime.fromisoformat(finished) if finished else None,
                progress,
                sid,
            )
            out[sid].append(run)
            by_id[run_id] = run
        if nodes and by_id:
            ids = list(by_id)
            node_rows = await self._db.execute_fetchall(
                f"SELECT run_id, call, outcome FROM run_nodes WHERE run_id IN"
                f" ({','.join('?' * len(ids))}) ORDER BY run_id, seq",
                ids,
            )
            for run_id, call, outcome in node_rows:
                add_nodes(by_id[run_id], [(call, outcome)])
        return out

    async def get_session(
        self, tenant_id: str, session_id: str, ttl_seconds: float
    ) -> tuple[session_rows.SessionRecord, list[executor_pb2.Run]] | None:
        record = await self._session_record(tenant_id, session_id, ttl_seconds)
        if record is None:
            return None
        turns = await self._turns(tenant_id, [session_id], nodes=True)
        return record, turns[session_id]

    async def list_sessions(
        self,
        tenant_id: str,
        ttl_seconds: float,
        cursor: session_rows.SessionCursor | None,
        limit: int,
    ) -> list[tuple[executor_pb2.SessionSummary, session_rows.SessionCursor]]:
        after = ""
        params: list[object] = [tenant_id, expired_before(ttl_seconds)]
        if cursor is not None:
            moment = from_micros(cursor.updated_us).isoformat()
            after = " AND (updated_at < ? OR (updated_at = ? AND session_id < ?))"
            params += [moment, moment, cursor.session_id]
        found = await self._db.execute_fetchall(
            "SELECT session_id, summary, summary_through_turn, created_at, updated_at, deleted"
            f" FROM sessions WHERE tenant_id = ? AND updated_at >= ?{after}"
            " ORDER BY updated_at DESC, session_id DESC LIMIT ?",
            (*params, limit),
        )
        records = [_record(tenant_id, *row) for row in found]
        turns = await self._turns(tenant_id, [r.session_id for r in records], nodes=False)
        return session_page(records, turns)

    async def save_summary(
        self, tenant_id: str, session_id: str, summary: str, through_turn: int
    ) -> None:
        await self._db.execute(
            "UPDATE sessions SET summary = ?, summary_through_turn = ?"
            " WHERE tenant_id = ? AND session_id = ? AND summary_through_turn < ?"
            " AND NOT deleted",
            (summary, through_turn, tenant_id, session_id, through_turn),
        )

    async def delete_session(self, tenant_id: str, session_id: str, ttl_seconds: float) -> int:
        params = {
            "tenant": tenant_id,
            "session": session_id,
            "running": RUNNING,
            "expired": expired_before(ttl_seconds),
        }
        turns = (await self._turns(tenant_id, [session_id], nodes=False))[session_id]
        cursor = await self._db.execute(
            "UPDATE sessions SET deleted = 1, summary = '', summary_through_turn = 0"
            " WHERE tenant_id = :tenant AND session_id = :session AND updated_at >= :expired"
            f" AND NOT EXISTS (SELECT 1 FROM runs WHERE {TURNS} AND status = :running)",
            params,
        )
        if cursor.rowcount == 0:
            if await self._session_record(tenant_id, session_id, ttl_seconds) is None:
                raise session_rows.session_not_found(session_id)
            raise session_rows.session_busy(session_id)
        for run in turns:
            await self._erase_run(run.run_id)
        return len(turns)

    async def _erase_run(self, run_id: str) -> None:
        """A finished turn's goal, answer, tool arguments and outputs, erased."""
        found = await self._db.execute_fetchall(
            "SELECT request, finished FROM runs WHERE run_id = ? AND status <> ?",
            (run_id, RUNNING),
        )
        for request, finished in found:
            await self._db.execute(
                "UPDATE runs SET goal = '', request = ?, finished = ? WHERE run_id = ?",
                (
                    session_rows.erased_request(request),
                    session_rows.erased_finished(finished),
                    run_id,
                ),
            )
            nodes = await self._db.execute_fetchall(
                "SELECT node_id, call, outcome FROM run_nodes WHERE run_id = ?", (run_id,)
            )
            await self._db.executemany(
                "UPDATE run_nodes SET call = ?, outcome = ? WHERE run_id = ? AND node_id = ?",
                [
                    (
                        session_rows.erased_call(call),
                        session_rows.erased_outcome(outcome),
                        run_id,
                        node_id,
                    )
                    for node_id, call, outcome in nodes
                ],
            )
