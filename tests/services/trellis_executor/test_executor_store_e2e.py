"""The embedded stack with its executor on PostgreSQL: a run is stored there, not in SQLite."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct
from trellis_cli.stack import start_stack


def node(node_id: str, tool: str, deps: tuple[str, ...] = (), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


async def test_explicit_plan_runs_with_executor_on_postgres(
    postgres_url: str, tmp_path: Path, channels
) -> None:
    stack = await start_stack(
        database_url=postgres_url, costs_database_url=f"sqlite:///{tmp_path}/costs.db"
    )
    try:
        executor = ExecutorClient(channels.get(stack.executor_target))
        plan = [node("a", "echo", value=1), node("b", "echo", ("a",), value="$a")]
        with context.request_scope(tenant_id="pg-tenant"):
            events = [e async for e in executor.run(executor_pb2.RunRequest(plan=plan))]
            run_id = events[0].run_id
            assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED
            stored = await executor.get_run(run_id)
    finally:
        await stack.stop()
    assert stored.tenant_id == "pg-tenant" and stored.status == executor_pb2.RUN_STATUS_SUCCEEDED
    assert [c.node_id for c in stored.plan] == ["a", "b"]
    assert [o.status for o in stored.outcomes] == [common_pb2.NODE_STATUS_SUCCEEDED] * 2
    # the rows really are in PostgreSQL (not in a SQLite file next to the ledger)
    conn = await asyncpg.connect(postgres_url)
    try:
        status = await conn.fetchval("SELECT status FROM runs WHERE run_id = $1", run_id)
        nodes = await conn.fetchval("SELECT count(*) FROM run_nodes WHERE run_id = $1", run_id)
    finally:
        await conn.close()
    assert (status, nodes) == (executor_pb2.RUN_STATUS_SUCCEEDED, 2)
