"""Group commit: concurrent writes of a run's state share transactions (PostgreSQL and
SQLite), every one durable when its caller returns, in the order submitted; a write
that may not be made (a lost lease, a duplicate node) fails alone."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis_executor.store import LeaseLost, RunStore, open_store

REQUEST = executor_pb2.RunRequest(goal="fan out", run_id="r1")


def call(node_id: str) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool="echo")


def outcome(node_id: str, cost: int = 1) -> common_pb2.NodeOutcome:
    return common_pb2.NodeOutcome(
        node_id=node_id, status=common_pb2.NODE_STATUS_SUCCEEDED, cost_nano_usd=cost
    )


@dataclass
class Stores:
    """Two replicas' stores over one database, its URL, and its duplicate-key error."""

    mine: RunStore
    other: RunStore
    url: str
    duplicate: type[Exception]


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[Stores]:
    duplicate = (
        sqlite3.IntegrityError if store_url.startswith("sqlite") else asyncpg.UniqueViolationError
    )
    mine = await open_store(store_url, owner="mine")
    other = await open_store(store_url, owner="other")
    yield Stores(mine, other, store_url, duplicate)
    await mine.close()
    await other.close()


async def test_concurrent_outcomes_take_fewer_commits_and_all_are_stored(
    stores: Stores,
) -> None:
    store = stores.mine
    await store.create("r1", "t", REQUEST, "ab" * 16)
    nodes = [f"n{i:02}" for i in range(40)]
    await store.add_nodes("r1", 1, [call(n) for n in nodes])
    before = store._writes.groups
    await asyncio.gather(*(store.set_outcome("r1", outcome(n, i)) for i, n in enumerate(nodes)))
    assert store._writes.groups - before < len(nodes)  # grouped
    reader = await open_store(stores.url, owner="reader")  # what another replica reads
    try:
        run = await reader.get("r1")
    finally:
        await reader.close()
    assert run is not None
    assert {o.node_id: o.cost_nano_usd for o in run.outcomes} == {n: i for i, n in enumerate(nodes)}


async def test_writes_of_one_run_keep_their_order_within_a_group(
    stores: Stores,
) -> None:
    store = stores.mine
    await store.create("r1", "t", REQUEST, "t")
    await store.add_nodes("r1", 1, [call("a")])
    # Submitted together: the second outcome of "a" must win, and the nodes planned
    # before their outcomes must exist when the outcomes are written.
    await asyncio.gather(
        store.set_outcome("r1", outcome("a", 1)),
        store.set_outcome("r1", outcome("a", 2)),
        store.add_nodes("r1", 2, [call("b")]),
        store.set_outcome("r1", outcome("b", 3)),
    )
    run = await store.get("r1")
    assert run is not None
    assert {o.node_id: o.cost_nano_usd for o in run.outcomes} == {"a": 2, "b": 3}


async def test_a_lost_run_fails_alone_in_its_group(
    stores: Stores,
) -> None:
    mine, other = stores.mine, stores.other
    await mine.create("kept", "t", REQUEST, "t")
    await mine.create("lost", "t", REQUEST, "t")
    await mine.add_nodes("kept", 1, [call(f"k{i}") for i in range(5)])
    await mine.add_nodes("lost", 1, [call("x")])
    await mine.release(["lost"])
    assert await other.claim(limit=1, run_id="lost") == ["lost"]
    results = await asyncio.gather(
        *(mine.set_outcome("kept", outcome(f"k{i}")) for i in range(5)),
        mine.set_outcome("lost", outcome("x")),
        return_exceptions=True,
    )
    assert results[:5] == [None] * 5
    assert isinstance(results[5], LeaseLost)
    kept = await mine.get("kept")
    lost = await mine.get("lost")
    assert kept is not None and len(kept.outcomes) == 5
    assert lost is not None and list(lost.outcomes) == []


async def test_a_failing_statement_fails_only_its_own_write(
    stores: Stores,
) -> None:
    store = stores.mine
    await store.create("r1", "t", REQUEST, "t")
    await store.add_nodes("r1", 1, [call("a"), call("b")])
    results = await asyncio.gather(
        store.set_outcome("r1", outcome("a")),
        store.add_nodes("r1", 3, [call("a")]),  # a duplicate node id
        store.set_outcome("r1", outcome("b")),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], stores.duplicate)
    run = await store.get("r1")
    assert run is not None and len(run.outcomes) == 2
