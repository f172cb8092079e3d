"""Faults: PostgreSQL restarted under running services (``postgres_cluster``, a private
cluster - never the machine's server).

The executor keeps its runs and cost accounting its ledger in that cluster; the other
services run as processes too (``process_stack``). Runs of chained ``sleep`` nodes
write to the run store every few hundred milliseconds, and every tool execution costs
money, so usage flows to the ledger all along. Then the database goes away under them:

- ``pg_ctl restart -m fast``: every connection is cut, transactions in flight roll back;
- stopped for a few seconds, then started: every connect is refused meanwhile.

Every run must end cleanly: SUCCEEDED, or FAILED with a clear error code; none stays
RUNNING once its lease (2 s here) has run out. What GetRun shows is consistent: every
outcome belongs to a planned node, once; a SUCCEEDED run has an outcome for every node;
the client's ``finished`` event and the stored status agree. New runs work afterwards,
and every tool execution reaches the ledger exactly once (the outboxes hold usage cost
accounting could not write, and the ledger's insert is idempotent).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import Unavailable
from trellis.runtime.postgres import DEFAULT_WITHIN, ReconnectingPool

RUNNING = executor_pb2.RUN_STATUS_RUNNING
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
NODE_SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
LEASE_SECONDS = 2.0
RUNS = 4
#: Each run: a chain of STEPS sleeps of STEP_MS, then an echo; one write per step.
STEPS, STEP_MS = 8, 250
SLEEP_COST, ECHO_COST = 2_000, 3_000
TOOLS_FILE = (
    "version: 1\ntools:\n"
    f"  - {{name: sleep, builtin: sleep, cache_ttl: 0, cost_nano_usd: {SLEEP_COST}}}\n"
    f"  - {{name: echo, builtin: echo, cache_ttl: 0, cost_nano_usd: {ECHO_COST}}}\n"
)
#: How long the stores retry a statement on connection errors (trellis.runtime.postgres).
RETRY_SECONDS = DEFAULT_WITHIN
#: A run's final state must be known within this after the database is back.
SETTLE_SECONDS = 45.0


def chain(prefix: str) -> list[common_pb2.ToolCall]:
    calls = [
        common_pb2.ToolCall(
            node_id=f"s{i}",
            tool="sleep",
            args=to_struct({"ms": STEP_MS}),
            depends_on=[f"s{i - 1}"] if i else [],
        )
        for i in range(STEPS)
    ]
    calls.append(
        common_pb2.ToolCall(
            node_id="done",
            tool="echo",
            args=to_struct({"value": prefix}),
            depends_on=[f"s{STEPS - 1}"],
        )
    )
    return calls


async def start_stack(process_stack, postgres_cluster, tmp_path: Path):
    runs_url = await postgres_cluster.create_database("runs")
    ledger_url = await postgres_cluster.create_database("ledger")
    tools = tmp_path / "tools.yaml"
    tools.write_text(TOOLS_FILE)
    stack = await process_stack(
        per_service={
            "executor": {
                "TRELLIS_DATABASE_URL": runs_url,
                "TRELLIS_LEASE_SECONDS": str(LEASE_SECONDS),
            },
            "costs": {"TRELLIS_DATABASE_URL": ledger_url},
            "toolgateway": {"TRELLIS_TOOLS_FILE": str(tools), "TRELLIS_TOOLS_RELOAD_SECONDS": "0"},
        },
    )
    return stack, runs_url, ledger_url


async def follow(stub, run_id: str, plan: list[common_pb2.ToolCall]) -> list:
    """The run's events as its client saw them (the stream may break: then what came)."""
    events: list[executor_pb2.RunResponse] = []
    try:
        async for event in stub.Run(executor_pb2.RunRequest(run_id=run_id, plan=plan), timeout=90):
            events.append(event)
    except grpc.aio.AioRpcError as error:
        print(f"{run_id}: stream ended {error.code().name}: {error.details()}")
    return events


async def settled(stub, run_id: str) -> executor_pb2.Run:
    """GetRun until the run is no longer RUNNING (fails the test after SETTLE_SECONDS)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            run = (await stub.GetRun(executor_pb2.GetRunRequest(run_id=run_id), timeout=5)).run
            if run.status != RUNNING:
                return run
        except grpc.aio.AioRpcError as error:
            run = None
            print(f"GetRun({run_id}): {error.code().name}: {error.details()}")
        if time.monotonic() > deadline:
            pytest.fail(f"run {run_id} still not finished {SETTLE_SECONDS:g}s later: {run}")
        await asyncio.sleep(0.25)


def check_consistent(run: executor_pb2.Run, plan: list[common_pb2.ToolCall]) -> None:
    planned = [call.node_id for call in run.plan]
    assert planned == [call.node_id for call in plan], planned  # stored whole, in order
    outcomes = [outcome.node_id for outcome in run.outcomes]
    assert len(outcomes) == len(set(outcomes)), outcomes  # one outcome per node
    assert set(outcomes) <= set(planned), outcomes  # none without its node
    if run.status == SUCCEEDED:
        assert sorted(outcomes) == sorted(planned)
        assert all(o.status == NODE_SUCCEEDED for o in run.outcomes), run.outcomes
    else:  # a clear error: the store stayed unreachable past its retries
        assert run.error.code == "RUN_STORE_UNAVAILABLE" and run.error.message, run


async def ledger_rows(ledger_url: str) -> dict[tuple[str, str], int]:
    conn = await asyncpg.connect(ledger_url, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT run_id, node_id, COUNT(*) AS n FROM usage WHERE kind = 'tool'"
            " GROUP BY run_id, node_id"
        )
    finally:
        await conn.close()
    return {(r["run_id"], r["node_id"]): r["n"] for r in rows}


@pytest.mark.parametrize(
    ("outage", "down_seconds"),
    [("restart", 0.0), ("down-3s", 3.0), ("down-15s", 15.0)],
)
async def test_runs_in_flight_end_cleanly_when_postgresql_restarts(
    process_stack, postgres_cluster, tmp_path: Path, channels, outage: str, down_seconds: float
) -> None:
    stack, _, ledger_url = await start_stack(process_stack, postgres_cluster, tmp_path)
    stub = executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))
    try:
        # Control: the stack works before anything happens.
        control = f"pg-control-{uuid.uuid4().hex[:8]}"
        echo = common_pb2.ToolCall(node_id="e", tool="echo", args=to_struct({"value": 1}))
        events = await follow(stub, control, [echo])
        assert events[-1].finished.status == SUCCEEDED, events[-1]

        plans = {f"pg-{outage}-{i}-{uuid.uuid4().hex[:8]}": chain(f"run{i}") for i in range(RUNS)}
        clients = {
            run_id: asyncio.create_task(follow(stub, run_id, plan))
            for run_id, plan in plans.items()
        }
        await asyncio.sleep(STEP_MS * 3 / 1000)  # every run a few steps in
        assert not any(task.done() for task in clients.values())
        if not down_seconds:
            await asyncio.to_thread(postgres_cluster.restart)
        else:
            await asyncio.to_thread(postgres_cluster.stop)
            await asyncio.sleep(down_seconds)
            await asyncio.to_thread(postgres_cluster.start)
        back = time.monotonic()

        seen = dict(zip(clients, await asyncio.gather(*clients.values()), strict=True))
        if down_seconds < RETRY_SECONDS:
            # A short outage only delays the writes: every client sees its run finish.
            for run_id, events in seen.items():
                assert events and events[-1].HasField("finished"), (run_id, events[-1:])
        finals = {run_id: await settled(stub, run_id) for run_id in plans}
        for run_id, run in finals.items():
            check_consistent(run, plans[run_id])
            events = seen[run_id]
            if events and events[-1].HasField("finished"):
                assert events[-1].finished.status == run.status, (run_id, events[-1], run)
        statuses = {
            run_id: executor_pb2.RunStatus.Name(run.status)
            + (f" {run.error.code}" if run.error.code else "")
            for run_id, run in finals.items()
        }
        print(f"outage {outage}: settled {time.monotonic() - back:.2f}s after; {statuses}")

        # New runs work afterwards.
        after = f"pg-after-{uuid.uuid4().hex[:8]}"
        events = await follow(stub, after, chain("after"))
        assert events[-1].finished.status == SUCCEEDED, events[-1]
        plans[after] = chain("after")
        finals[after] = await settled(stub, after)

        # Every execution reaches the ledger (maybe late), none twice: a node the client
        # saw start once and finish has exactly one row; one re-run after a resume has
        # one per execution.
        executed = {
            (run_id, o.node_id)
            for run_id, run in finals.items()
            for o in run.outcomes
            if o.attempts > 0
        }
        settled_at = time.monotonic()
        deadline = settled_at + 60
        while not executed <= set(rows := await ledger_rows(ledger_url)):
            assert time.monotonic() < deadline, sorted(executed - set(rows))
            await asyncio.sleep(0.25)
        print(f"ledger complete {time.monotonic() - settled_at:.2f}s after the runs settled")
        for run_id, events in seen.items():
            starts = [e.node_started for e in events if e.HasField("node_started")]
            once = {s.node_id for s in starts if s.attempt == 1}
            once -= {s.node_id for s in starts if s.attempt != 1}
            finished = {
                e.node_finished.outcome.node_id for e in events if e.HasField("node_finished")
            }
            for node_id in once & finished:
                if (run_id, node_id) in executed:
                    assert rows[(run_id, node_id)] == 1, (run_id, node_id, rows[(run_id, node_id)])
    except BaseException:
        for name in ("executor", "costs", "toolgateway"):
            print(f"----- {name} -----\n{stack.processes[name].output()}")
        print(f"----- postgres -----\n{postgres_cluster.output()}")
        raise


async def test_the_stores_pool_rides_through_a_restart_and_names_a_longer_outage(
    postgres_cluster,
) -> None:
    """``ReconnectingPool`` alone: a statement cut by the restart is run again, an SQL
    error is not, and a database down past the retry window is a clear ``Unavailable``."""
    url = await postgres_cluster.create_database("pool")
    pool = ReconnectingPool(
        await asyncpg.create_pool(url, min_size=2, max_size=2),
        what="test",
        reason="TEST_DB_UNAVAILABLE",
        within=3.0,
    )
    try:
        cut = asyncio.create_task(pool.fetchval("SELECT 42 FROM pg_sleep(0.5)"))
        await asyncio.sleep(0.1)  # under way when the server goes
        await asyncio.to_thread(postgres_cluster.restart)
        assert await asyncio.wait_for(cut, 10) == 42
        assert await pool.fetchval("SELECT 1") == 1
        with pytest.raises(asyncpg.UndefinedTableError):
            await pool.fetch("SELECT * FROM nowhere")

        await asyncio.to_thread(postgres_cluster.stop)
        started = time.monotonic()
        with pytest.raises(Unavailable) as raised:
            await pool.fetchval("SELECT 1")
        assert raised.value.reason == "TEST_DB_UNAVAILABLE"
        assert 2.0 < time.monotonic() - started < 4.5
        await asyncio.to_thread(postgres_cluster.start)
        assert await pool.fetchval("SELECT 1") == 1  # and it recovers by itself
    finally:
        await pool.close()
