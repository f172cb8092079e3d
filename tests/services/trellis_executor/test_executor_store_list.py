"""``list_runs``, checked against every backend (SQLite and PostgreSQL): newest first,
keyset pages, each filter, tenant isolation, summaries with node counts, the indexes the
queries use, and older databases that gain the listing columns when opened."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC

import asyncpg
import pytest

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import sqlite
from trellis.runtime.convert import duration
from trellis_executor.store import RunStore, open_store
from trellis_executor.store import postgres as postgres_store
from trellis_executor.store import sqlite as sqlite_store
from trellis_executor.store.base import (
    GOAL_PREFIX_CHARS,
    Cursor,
    RunQuery,
    from_micros,
    to_micros,
)

RUNNING = executor_pb2.RUN_STATUS_RUNNING
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
FAILED = executor_pb2.RUN_STATUS_FAILED


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[RunStore]:
    opened = await open_store(store_url)
    yield opened
    await opened.close()


def node(node_id: str) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool="echo")


def outcome(node_id: str, status: int) -> common_pb2.NodeOutcome:
    return common_pb2.NodeOutcome(node_id=node_id, status=status)  # type: ignore[arg-type]


async def create(store: RunStore, run_id: str, tenant: str = "acme", **kw: str) -> None:
    request = executor_pb2.RunRequest(goal=kw.pop("goal", f"goal of {run_id}"), run_id=run_id)
    await store.create(run_id, tenant, request, "ab" * 16, **kw)


async def ids(store: RunStore, tenant: str = "acme", query: RunQuery | None = None) -> list[str]:
    query = query or RunQuery()
    return [s.run_id for s, _ in await store.list_runs(tenant, query, None, 1000)]


async def test_newest_first_in_keyset_pages_without_repeats(store: RunStore) -> None:
    for i in range(7):
        await create(store, f"r{i}")
    pages, cursor = [], None
    while True:
        rows = await store.list_runs("acme", RunQuery(), cursor, 3)
        pages.append([summary.run_id for summary, _ in rows])
        if len(rows) < 3:
            break
        cursor = rows[-1][1]
        await create(store, f"s{len(pages)}")  # a run created meanwhile shifts nothing
    assert pages == [["r6", "r5", "r4"], ["r3", "r2", "r1"], ["r0"]]


async def raw(store: RunStore, sql: str) -> None:
    """A statement on the store's own database (the tests' way to set creation times)."""
    if isinstance(store, sqlite_store.SqliteRunStore):
        await store._db.execute(sql)
    else:
        await store._pool.execute(sql)  # type: ignore[attr-defined]


async def test_equal_creation_times_are_ordered_by_run_id(store: RunStore) -> None:
    for run_id in ("b", "c", "a", "d"):
        await create(store, run_id)
    await raw(
        store, "UPDATE runs SET created_at = (SELECT created_at FROM runs WHERE run_id = 'a')"
    )
    first = await store.list_runs("acme", RunQuery(), None, 2)
    second = await store.list_runs("acme", RunQuery(), first[-1][1], 2)
    assert [s.run_id for s, _ in first + second] == ["d", "c", "b", "a"]


async def test_a_tenant_sees_only_its_own_runs(store: RunStore) -> None:
    await create(store, "mine-1")
    await create(store, "theirs", tenant="other")
    await create(store, "mine-2")
    assert await ids(store) == ["mine-2", "mine-1"]
    assert await ids(store, "other") == ["theirs"]
    assert await ids(store, "nobody") == []


async def test_filters_status_time_and_session(store: RunStore) -> None:
    await create(store, "r0")
    await create(store, "r1", session_id="chat-1")
    await create(store, "r2")
    await create(store, "r3", session_id="chat-1")
    await store.finish("r1", executor_pb2.RunFinished(status=SUCCEEDED))
    await store.finish("r2", executor_pb2.RunFinished(status=FAILED))
    assert await ids(store, query=RunQuery(status=SUCCEEDED)) == ["r1"]
    assert await ids(store, query=RunQuery(status=RUNNING)) == ["r3", "r0"]
    assert await ids(store, query=RunQuery(session_id="chat-1")) == ["r3", "r1"]
    assert await ids(store, query=RunQuery(session_id="chat-1", status=RUNNING)) == ["r3"]

    times = {
        s.run_id: to_micros(s.created_at.ToDatetime(tzinfo=UTC))
        for s, _ in await store.list_runs("acme", RunQuery(), None, 10)
    }
    window = RunQuery(created_after_us=times["r1"], created_before_us=times["r3"])
    assert await ids(store, query=window) == ["r2", "r1"]  # after is inclusive, before is not
    assert await ids(store, query=RunQuery(created_after_us=times["r3"] + 1)) == []


async def test_a_summary_says_what_the_run_did(store: RunStore) -> None:
    long_goal = "x" * (GOAL_PREFIX_CHARS + 30)
    await create(store, "r1", goal=long_goal)
    await store.add_nodes("r1", 1, [node("a"), node("b"), node("c"), node("d")])
    await store.set_outcome("r1", outcome("a", common_pb2.NODE_STATUS_SUCCEEDED))
    await store.set_outcome("r1", outcome("b", common_pb2.NODE_STATUS_FAILED))
    await store.set_outcome("r1", outcome("c", common_pb2.NODE_STATUS_SKIPPED))
    [(running, _)] = await store.list_runs("acme", RunQuery(), None, 10)
    assert running.status == RUNNING and not running.HasField("finished_at")
    assert (running.goal, running.goal_truncated) == ("x" * GOAL_PREFIX_CHARS, True)
    assert running.nodes == executor_pb2.NodeCounts(
        total=4, pending=1, succeeded=1, failed=1, skipped=1
    )
    await store.set_outcome("r1", outcome("d", common_pb2.NODE_STATUS_CANCELLED))
    error = common_pb2.Error(code="NODES_FAILED", message="b failed")
    await store.finish(
        "r1",
        executor_pb2.RunFinished(
            status=FAILED,
            usage=common_pb2.Usage(model="m", input_tokens=10, output_tokens=5),
            cost_nano_usd=1234,
            cache_hits=1,
            duration=duration(1.5),
            error=error,
            failed_nodes=1,
        ),
    )
    [(done, _)] = await store.list_runs("acme", RunQuery(), None, 10)
    assert done.nodes == executor_pb2.NodeCounts(
        total=4, succeeded=1, failed=1, skipped=1, cancelled=1
    )
    assert (done.status, done.cost_nano_usd, done.cache_hits, done.failed_nodes) == (
        FAILED,
        1234,
        1,
        1,
    )
    assert (done.usage.input_tokens, done.usage.output_tokens, done.error) == (10, 5, error)
    assert done.duration.seconds == 1 and done.duration.nanos == 500_000_000
    assert done.trace_id == "ab" * 16 and done.HasField("finished_at")


async def test_each_filter_is_served_by_an_index(store: RunStore) -> None:
    queries = {
        "runs_by_tenant": RunQuery(),
        "runs_by_tenant_status": RunQuery(status=SUCCEEDED),
        "runs_by_tenant_session": RunQuery(session_id="chat-1"),
    }
    on_sqlite = isinstance(store, sqlite_store.SqliteRunStore)
    for index, query in queries.items():
        params: list[object] = []

        def mark(value: object, params: list[object] = params) -> str:
            params.append(value)
            return "?" if on_sqlite else f"${len(params)}"

        at = (lambda us: from_micros(us).isoformat()) if on_sqlite else from_micros
        where = query.where("acme", Cursor(1, "r"), mark, at)
        sql = f"SELECT run_id FROM runs WHERE {where} ORDER BY created_at DESC, run_id DESC"
        if on_sqlite:
            plan = str(await store._db.execute_fetchall(f"EXPLAIN QUERY PLAN {sql}", params))
        else:

            async def explain(
                conn: asyncpg.Connection, sql: str = sql, params: list[object] = params
            ) -> str:
                async with conn.transaction():  # a tiny table: make the planner show its index
                    await conn.execute("SET LOCAL enable_seqscan = off")
                    rows = await conn.fetch(f"EXPLAIN {sql}", *params)
                return str([row[0] for row in rows])

            plan = await store._pool.run(explain)  # type: ignore[attr-defined]
        assert index in plan, (index, plan)


async def test_an_older_database_gains_the_listing_columns(store_url: str) -> None:
    """A store written before listing existed: no session_id, no node status column, an
    outcome already stored. Opened now, its runs list with true node counts."""
    outcome_blob = outcome("n1", common_pb2.NODE_STATUS_FAILED).SerializeToString()
    request = executor_pb2.RunRequest(goal="old").SerializeToString()
    if store_url.startswith("sqlite"):
        old_schema = sqlite_store.SCHEMA.split("CREATE TABLE IF NOT EXISTS store_meta")[0]
        db = await sqlite.connect(store_url, autocommit=True)
        await db.executescript(old_schema)
        await db.execute(
            "INSERT INTO runs (run_id, tenant_id, goal, status, request, trace_id, created_at)"
            " VALUES ('old', 'acme', 'old', 1, ?, 't', '2026-01-01T00:00:00+00:00')",
            (request,),
        )
        await db.execute(
            "INSERT INTO run_nodes (run_id, node_id, seq, call, outcome) VALUES"
            " ('old', 'n1', 1, ?, ?)",
            (node("n1").SerializeToString(), outcome_blob),
        )
        await db.close()
    else:
        old_schema = postgres_store.SCHEMA.split(
            "ALTER TABLE runs ADD COLUMN IF NOT EXISTS session"
        )[0]
        conn = await asyncpg.connect(store_url)
        await conn.execute(old_schema)
        await conn.execute(
            "INSERT INTO runs (run_id, tenant_id, goal, status, request, trace_id)"
            " VALUES ('old', 'acme', 'old', 1, $1, 't')",
            request,
        )
        await conn.execute(
            "INSERT INTO run_nodes (run_id, node_id, seq, call, outcome) VALUES"
            " ('old', 'n1', 1, $1, $2)",
            node("n1").SerializeToString(),
            outcome_blob,
        )
        await conn.close()
    store = await open_store(store_url)
    try:
        [(summary, _)] = await store.list_runs("acme", RunQuery(), None, 10)
        assert summary.run_id == "old" and summary.session_id == ""
        assert summary.nodes == executor_pb2.NodeCounts(total=1, failed=1)
    finally:
        await store.close()


async def test_every_store_on_one_database_signs_with_one_key(store_url: str) -> None:
    first, second = await open_store(store_url), await open_store(store_url)
    try:
        assert len(first.page_token_key) == 32
        assert first.page_token_key == second.page_token_key
    finally:
        await first.close()
        await second.close()
