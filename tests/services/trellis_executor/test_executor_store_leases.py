"""Run ownership in the store: leases, take-over, fencing, progress — on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis_executor.store import LeaseLost, Progress, RunStore, open_store

RUNNING = executor_pb2.RUN_STATUS_RUNNING
REQUEST = executor_pb2.RunRequest(goal="check the disk", run_id="r1")
LEASE = 0.4


@pytest.fixture
async def replicas(store_url: str) -> AsyncIterator[tuple[RunStore, RunStore]]:
    """Two replicas' stores on one database, with short leases."""
    a = await open_store(store_url, owner="exec-a", lease_seconds=LEASE)
    b = await open_store(store_url, owner="exec-b", lease_seconds=LEASE)
    yield a, b
    await a.close()
    await b.close()


def outcome(node_id: str) -> common_pb2.NodeOutcome:
    return common_pb2.NodeOutcome(node_id=node_id, status=common_pb2.NODE_STATUS_SUCCEEDED)


async def test_a_live_lease_cannot_be_claimed(replicas) -> None:
    a, b = replicas
    await a.create("r1", "t", REQUEST, "ab" * 16, "cd" * 8)
    assert await b.claim(limit=10) == []
    assert await b.claim(limit=10, run_id="r1", own=True) == []  # own= only takes b's runs
    assert await a.renew(["r1"]) == {"r1"}
    await asyncio.sleep(LEASE * 0.75)
    assert await a.renew(["r1"]) == {"r1"}  # renewed in time: still a's
    await asyncio.sleep(LEASE * 0.75)
    assert await b.claim(limit=10) == []


async def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(replicas) -> None:
    a, b = replicas
    await a.create("r1", "t", REQUEST, "ab" * 16, "cd" * 8)
    await a.add_nodes("r1", 1, [common_pb2.ToolCall(node_id="n1", tool="echo")])
    await asyncio.sleep(LEASE + 0.1)
    assert await b.claim(limit=10) == ["r1"]
    assert await a.claim(limit=10) == []  # b's lease is fresh now
    # a stalled past its lease: every write it tries is refused, nothing changes
    for write in (
        a.add_nodes("r1", 2, [common_pb2.ToolCall(node_id="n2", tool="echo")]),
        a.set_outcome("r1", outcome("n1")),
        a.save_progress("r1", Progress(round=1)),
        a.finish("r1", executor_pb2.RunFinished(status=executor_pb2.RUN_STATUS_SUCCEEDED)),
    ):
        with pytest.raises(LeaseLost) as lost:
            await write
        assert lost.value.reason == "LEASE_LOST"
    assert await a.renew(["r1"]) == set()
    run = await b.get("r1")
    assert run is not None and run.status == RUNNING
    assert [c.node_id for c in run.plan] == ["n1"] and list(run.outcomes) == []
    # the new owner writes as usual
    await b.set_outcome("r1", outcome("n1"))
    run = await b.get("r1")
    assert run is not None and [o.node_id for o in run.outcomes] == ["n1"]


async def test_only_running_runs_are_claimed_and_each_by_one_replica(replicas) -> None:
    a, b = replicas
    for run_id in ("r1", "r2", "r3"):
        await a.create(run_id, "t", REQUEST, "t")
    await a.finish("r3", executor_pb2.RunFinished(status=executor_pb2.RUN_STATUS_SUCCEEDED))
    await asyncio.sleep(LEASE + 0.1)
    first, second = await asyncio.gather(b.claim(limit=1), b.claim(limit=10))
    assert sorted(first + second) == ["r1", "r2"]  # no run twice, the finished one never


async def test_own_claims_a_restarted_replicas_runs_at_once(replicas, store_url: str) -> None:
    a, _ = replicas
    await a.create("r1", "t", REQUEST, "t")
    again = await open_store(store_url, owner="exec-a", lease_seconds=LEASE)
    try:
        assert await again.claim(limit=10) == []  # not expired yet
        assert await again.claim(limit=10, own=True) == ["r1"]
    finally:
        await again.close()


async def test_release_hands_a_run_over_without_waiting(replicas) -> None:
    a, b = replicas
    await a.create("r1", "t", REQUEST, "t")
    await a.release(["r1"])
    assert await b.claim(limit=10) == ["r1"]


async def test_load_returns_request_progress_resumes_and_root_span(replicas) -> None:
    a, b = replicas
    await a.create("r1", "t", REQUEST, "ab" * 16, "cd" * 8)
    saved = await a.load("r1")
    assert saved is not None
    assert (saved.request, saved.progress, saved.resumes, saved.span_id) == (
        REQUEST,
        Progress(),
        0,
        "cd" * 8,
    )
    usage = common_pb2.Usage(model="m", input_tokens=10, output_tokens=5, cost_nano_usd=77)
    progress = Progress(
        round=1,
        joining=True,
        round_start=3,
        replan_reason="why",
        usage=usage,
        round_starts=(3,),
        plan_format=common_pb2.PLAN_FORMAT_TOOL_CALLS,
    )
    assert (await a.get("r1")).plan_format == common_pb2.PLAN_FORMAT_UNSPECIFIED
    await a.save_progress("r1", progress)
    assert (await a.get("r1")).plan_format == common_pb2.PLAN_FORMAT_TOOL_CALLS  # GetRun
    await a.release(["r1"])
    await b.claim(limit=1)
    saved = await b.load("r1")
    assert saved is not None and saved.progress == progress and saved.resumes == 1
    old = '{"round": 2, "joining": false, "round_start": 0, "replan_reason": "", "usage": {}}'
    assert Progress.from_json(old).plan_format == 0  # saved before the field existed
    assert await a.load("nope") is None


async def test_lease_upkeep_interleaves_with_many_runs_writes(replicas) -> None:
    """Renewals and claims run beside every run's writes on one shared connection."""
    a, _ = replicas
    ids = [f"r{i}" for i in range(30)]

    async def one_run(run_id: str) -> None:
        await a.create(run_id, "t", REQUEST, "t")
        await a.add_nodes(run_id, 1, [common_pb2.ToolCall(node_id="n1", tool="echo")])
        await a.set_outcome(run_id, outcome("n1"))
        await a.get(run_id)
        await a.finish(run_id, executor_pb2.RunFinished(status=executor_pb2.RUN_STATUS_SUCCEEDED))

    async def upkeep() -> None:
        for _ in range(20):
            await a.renew(ids)
            await a.claim(limit=8)
            await asyncio.sleep(0)

    await asyncio.gather(*(one_run(run_id) for run_id in ids), upkeep())
    runs = [await a.get(run_id) for run_id in ids]
    assert all(r is not None and r.status == executor_pb2.RUN_STATUS_SUCCEEDED for r in runs)


async def test_a_run_finished_meanwhile_still_counts_as_held(replicas) -> None:
    a, _ = replicas
    await a.create("r1", "t", REQUEST, "t")
    await a.finish("r1", executor_pb2.RunFinished(status=executor_pb2.RUN_STATUS_SUCCEEDED))
    assert await a.renew(["r1"]) == {"r1"}  # finished by its owner, not taken over


async def test_cancel_requests_are_seen_by_the_owner(replicas) -> None:
    a, b = replicas
    await a.create("r1", "t", REQUEST, "t")
    await a.create("r2", "t", REQUEST, "t")
    assert await a.cancel_requested(["r1", "r2"]) == set()
    await b.request_cancel("r1")  # any replica may ask
    assert await a.cancel_requested(["r1", "r2"]) == {"r1"}
