"""The run-store contract, checked against every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import AlreadyExists
from trellis_executor.store import PostgresRunStore, RunStore, SqliteRunStore, open_store

RUNNING = executor_pb2.RUN_STATUS_RUNNING
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[RunStore]:
    opened = await open_store(store_url)
    yield opened
    await opened.close()


def call(node_id: str, deps: tuple[str, ...] = ()) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        node_id=node_id, tool="shell", args=to_struct({"command": node_id}), depends_on=deps
    )


def outcome(node_id: str) -> common_pb2.NodeOutcome:
    return common_pb2.NodeOutcome(
        node_id=node_id, status=common_pb2.NODE_STATUS_SUCCEEDED, cost_nano_usd=7, attempts=1
    )


REQUEST = executor_pb2.RunRequest(goal="check the disk", run_id="r1")


async def test_url_picks_backend(store: RunStore, store_url: str) -> None:
    expected = SqliteRunStore if store_url.startswith("sqlite") else PostgresRunStore
    assert isinstance(store, expected)


async def test_create_then_get_round_trips(store: RunStore) -> None:
    assert await store.get("r1") is None
    await store.create("r1", "tenant-a", REQUEST, "ab" * 16)
    run = await store.get("r1")
    assert run is not None
    assert (run.run_id, run.tenant_id, run.goal, run.status, run.trace_id) == (
        "r1",
        "tenant-a",
        "check the disk",
        RUNNING,
        "ab" * 16,
    )
    assert run.created_at.seconds > 0 and not run.HasField("finished_at")
    assert list(run.plan) == [] and list(run.outcomes) == []


async def test_duplicate_run_id_is_already_exists(store: RunStore) -> None:
    await store.create("r1", "tenant-a", REQUEST, "t")
    with pytest.raises(AlreadyExists) as caught:
        await store.create("r1", "tenant-b", REQUEST, "t2")
    assert caught.value.reason == "RUN_EXISTS"
    run = await store.get("r1")
    assert run is not None and run.tenant_id == "tenant-a"  # the first one is untouched


async def test_nodes_outcomes_and_finish_are_reflected_by_get(store: RunStore) -> None:
    await store.create("r1", "tenant-a", REQUEST, "t")
    # planned out of node-id order: get returns planning order (seq), not key order
    await store.add_nodes("r1", 1, [call("z")])
    await store.add_nodes("r1", 2, [call("a", ("z",))])
    await store.set_outcome("r1", outcome("z"))
    run = await store.get("r1")
    assert run is not None
    assert [c.node_id for c in run.plan] == ["z", "a"] and run.plan[1].depends_on == ["z"]
    assert list(run.outcomes) == [outcome("z")]

    await store.set_outcome("r1", outcome("a"))
    finished = executor_pb2.RunFinished(
        status=SUCCEEDED,
        answer="42",
        usage=common_pb2.Usage(input_tokens=3, output_tokens=4),
        cost_nano_usd=99,
        cache_hits=1,
    )
    await store.finish("r1", finished)
    run = await store.get("r1")
    assert run is not None
    assert (run.status, run.answer, run.cost_nano_usd, run.cache_hits) == (SUCCEEDED, "42", 99, 1)
    assert (run.usage.input_tokens, run.usage.output_tokens) == (3, 4)
    assert [o.node_id for o in run.outcomes] == ["z", "a"]
    assert run.finished_at.ToDatetime() >= run.created_at.ToDatetime()
    assert not run.HasField("error")


async def test_failed_run_keeps_its_error(store: RunStore) -> None:
    await store.create("r1", "tenant-a", REQUEST, "t")
    error = common_pb2.Error(code="DEADLINE_EXCEEDED", message="too slow")
    await store.finish(
        "r1", executor_pb2.RunFinished(status=executor_pb2.RUN_STATUS_FAILED, error=error)
    )
    run = await store.get("r1")
    assert run is not None and run.status == executor_pb2.RUN_STATUS_FAILED
    assert run.error == error


async def test_writes_are_visible_to_a_second_replica(store: RunStore, store_url: str) -> None:
    """Each method commits before it returns: another store on the same URL sees it."""
    other = await open_store(store_url)  # also re-runs the schema on an existing database
    try:
        await store.create("r1", "tenant-a", REQUEST, "t")
        await store.add_nodes("r1", 1, [call("n1")])
        await store.set_outcome("r1", outcome("n1"))
        seen = await other.get("r1")
        assert seen is not None and [o.node_id for o in seen.outcomes] == ["n1"]
        with pytest.raises(AlreadyExists):
            await other.create("r1", "tenant-a", REQUEST, "t")
        await other.finish("r1", executor_pb2.RunFinished(status=SUCCEEDED, answer="ok"))
        run = await store.get("r1")
        assert run is not None and (run.status, run.answer) == (SUCCEEDED, "ok")
    finally:
        await other.close()


async def test_a_batch_of_nodes_is_stored_in_order_after_earlier_ones(store: RunStore) -> None:
    await store.create("r1", "tenant-a", REQUEST, "t")
    await store.add_nodes("r1", 1, [call("first")])
    await store.add_nodes("r1", 2, [call(f"b{i}") for i in range(40)])
    run = await store.get("r1")
    assert run is not None
    assert [c.node_id for c in run.plan] == ["first", *[f"b{i}" for i in range(40)]]
