"""Single-flight: identical concurrent calls of a cacheable tool run the backend once;
the others share its outcome (cache_hit, nothing charged), each with its own node id."""

import asyncio
from collections.abc import Sequence

import pytest
from opentelemetry.trace import NoOpTracer

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value
from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.policy.singleflight import SingleFlight
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import FunctionTool, Spec, ToolError

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
Mode = common_pb2.CacheMode


# -- single-flight alone ---------------------------------------------------------------


async def test_concurrent_callers_of_one_key_share_one_run() -> None:
    flights: SingleFlight[int] = SingleFlight()
    runs, gate = [], asyncio.Event()

    async def work() -> int:
        runs.append(1)
        await gate.wait()
        return 42

    calls = [asyncio.create_task(flights.do("k", work)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*calls)
    assert len(runs) == 1
    assert results == [(42, False)] + [(42, True)] * 9
    assert len(flights) == 0  # landed and forgotten: the next call runs again
    assert await flights.do("k", work) == (42, False) and len(runs) == 2


async def test_different_keys_fly_separately() -> None:
    flights: SingleFlight[str] = SingleFlight()

    async def work(key: str) -> str:
        await asyncio.sleep(0.01)
        return key

    results = await asyncio.gather(*(flights.do(k, lambda k=k: work(k)) for k in "abc"))
    assert results == [("a", False), ("b", False), ("c", False)]


async def test_the_runs_exception_reaches_every_caller() -> None:
    flights: SingleFlight[int] = SingleFlight()

    async def boom() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    results = await asyncio.gather(
        *(flights.do("k", boom) for _ in range(3)), return_exceptions=True
    )
    assert [type(r) for r in results] == [ValueError] * 3


async def test_the_leader_going_away_does_not_cancel_the_followers() -> None:
    flights: SingleFlight[int] = SingleFlight()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    leader = asyncio.create_task(flights.do("k", work))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flights.do("k", work))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await follower == (7, True)
    assert leader.cancelled()


async def test_the_run_is_cancelled_when_every_caller_is_gone() -> None:
    flights: SingleFlight[int] = SingleFlight()
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    calls = [asyncio.create_task(flights.do("k", work)) for _ in range(2)]
    await asyncio.sleep(0)
    for call in calls:
        call.cancel()
    await asyncio.wait_for(cancelled.wait(), 1)
    await asyncio.sleep(0)
    assert len(flights) == 0


async def test_callers_are_answered_before_then_and_the_next_flight_waits_for_it() -> None:
    flights: SingleFlight[int] = SingleFlight()
    runs, written, writing = [], asyncio.Event(), asyncio.Event()

    async def work() -> int:
        runs.append(1)
        return len(runs)

    async def write(value: int) -> None:
        writing.set()
        await written.wait()

    assert await flights.do("k", work, then=write) == (1, False)  # answered before the write
    await writing.wait()
    late = asyncio.create_task(flights.do("k", work))
    await asyncio.sleep(0.01)
    assert not late.done() and len(runs) == 1  # waits for the write to finish
    written.set()
    assert await late == (2, False)  # then flies on its own (in the invoker: a cache hit)
    assert len(flights) == 0


async def test_a_failing_then_is_dropped() -> None:
    flights: SingleFlight[int] = SingleFlight()

    async def work() -> int:
        return 1

    async def broken(value: int) -> None:
        raise RuntimeError("write failed")

    assert await flights.do("k", work, then=broken) == (1, False)
    await asyncio.sleep(0.01)
    assert len(flights) == 0


# -- inside the invoker ----------------------------------------------------------------


class Slow:
    """A cacheable tool that counts its backend runs and waits for a gate."""

    def __init__(self, *, cache_ttl: float = 60, cost: int = 0, shared: bool = False) -> None:
        self.runs = 0
        self.gate = asyncio.Event()
        self.fail: Exception | None = None
        spec = Spec(
            "slow_lookup",
            "a slow, cacheable lookup",
            {"type": "object"},
            {"type": "object"},
            cache_ttl=cache_ttl,
            cost_nano_usd=cost,
            shared_cache=shared,
        )
        self.tool = FunctionTool(spec, self._run)

    async def _run(self, args: dict) -> dict:
        self.runs += 1
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {"answer": args.get("q"), "run": self.runs}


class FakeCache:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.gets = self.sets = 0

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None:
        self.sets += 1
        self.data[key] = value


async def fire(
    invoker: Invoker, calls: list[Call], **kwargs
) -> list[asyncio.Task[common_pb2.NodeOutcome]]:
    """Start the calls and let them reach the backend (or join its flight)."""
    tasks = [asyncio.create_task(invoker.invoke(c, **kwargs)) for c in calls]
    await asyncio.sleep(0.01)
    return tasks


async def test_100_identical_concurrent_calls_run_the_backend_once() -> None:
    slow, cache = Slow(cost=1_000), FakeCache()
    invoker = Invoker(ToolRegistry([slow.tool]), cache, NoOpTracer())
    calls = [Call("slow_lookup", {"q": "x"}, node_id=f"n{i}") for i in range(100)]
    tasks = await fire(invoker, calls)
    slow.gate.set()
    outcomes = await asyncio.gather(*tasks)
    assert slow.runs == 1
    assert (cache.gets, cache.sets) == (1, 1)  # one lookup, one write for the whole flight
    assert [o.node_id for o in outcomes] == [f"n{i}" for i in range(100)]
    assert all(o.status == SUCCEEDED for o in outcomes)
    assert all(from_value(o.output) == {"answer": "x", "run": 1} for o in outcomes)
    leader, followers = outcomes[0], outcomes[1:]
    assert (leader.cache_hit, leader.attempts, leader.cost_nano_usd) == (False, 1, 1_000)
    assert {(o.cache_hit, o.attempts, o.cost_nano_usd) for o in followers} == {(True, 0, 0)}
    assert all(o.HasField("started_at") and o.HasField("finished_at") for o in outcomes)


async def test_single_flight_works_without_a_cache() -> None:
    slow = Slow()
    invoker = Invoker(ToolRegistry([slow.tool]), None, NoOpTracer())
    tasks = await fire(invoker, [Call("slow_lookup", {"q": 1})] * 20)
    slow.gate.set()
    await asyncio.gather(*tasks)
    assert slow.runs == 1


async def test_different_args_or_tenants_do_not_share_a_flight() -> None:
    slow = Slow()
    invoker = Invoker(ToolRegistry([slow.tool]), None, NoOpTracer())
    tasks = await fire(invoker, [Call("slow_lookup", {"q": q}) for q in (1, 2, 1, 2)])
    for tenant in ("acme", "globex"):
        with context.request_scope(tenant_id=tenant):
            tasks += await fire(invoker, [Call("slow_lookup", {"q": 3})] * 3)
    slow.gate.set()
    await asyncio.gather(*tasks)
    assert slow.runs == 4  # q=1, q=2, and q=3 once per tenant


async def test_shared_cache_tools_share_flights_across_tenants() -> None:
    slow = Slow(shared=True)
    invoker = Invoker(ToolRegistry([slow.tool]), None, NoOpTracer())
    tasks = []
    for tenant in ("acme", "globex"):
        with context.request_scope(tenant_id=tenant):
            tasks += await fire(invoker, [Call("slow_lookup", {"q": 3})] * 3)
    slow.gate.set()
    await asyncio.gather(*tasks)
    assert slow.runs == 1


async def test_uncacheable_tools_are_not_single_flighted() -> None:
    slow = Slow(cache_ttl=0)
    invoker = Invoker(ToolRegistry([slow.tool]), FakeCache(), NoOpTracer())
    tasks = await fire(invoker, [Call("slow_lookup", {"q": 1})] * 10)
    slow.gate.set()
    await asyncio.gather(*tasks)
    assert slow.runs == 10


async def test_bypass_calls_do_not_join_a_flight_that_reads_the_cache() -> None:
    slow = Slow()
    invoker = Invoker(ToolRegistry([slow.tool]), FakeCache(), NoOpTracer())
    tasks = await fire(invoker, [Call("slow_lookup", {"q": 1})] * 3)
    tasks += await fire(
        invoker, [Call("slow_lookup", {"q": 1})] * 3, cache_mode=Mode.CACHE_MODE_BYPASS
    )
    slow.gate.set()
    await asyncio.gather(*tasks)
    assert slow.runs == 2


async def test_followers_share_a_failure_but_it_is_no_cache_hit() -> None:
    slow, cache = Slow(), FakeCache()
    slow.fail = ToolError("UPSTREAM_DOWN", "down")
    invoker = Invoker(ToolRegistry([slow.tool]), cache, NoOpTracer())
    tasks = await fire(invoker, [Call("slow_lookup", {"q": 1})] * 5)
    slow.gate.set()
    outcomes = await asyncio.gather(*tasks)
    assert slow.runs == 1 and cache.sets == 0
    assert {(o.status, o.error.code, o.cache_hit) for o in outcomes} == {
        (FAILED, "UPSTREAM_DOWN", False)
    }
    assert [o.attempts for o in outcomes] == [1, 0, 0, 0, 0]


async def test_followers_get_the_contract_error_too() -> None:
    slow = Slow()
    slow.fail = InvalidArgument("bad", reason="BAD_QUERY")
    invoker = Invoker(ToolRegistry([slow.tool]), None, NoOpTracer())
    tasks = await fire(invoker, [Call("slow_lookup", {"q": 1})] * 3)
    slow.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [getattr(r, "reason", None) for r in results] == ["BAD_QUERY"] * 3
    assert slow.runs == 1


async def test_a_cancelled_leader_does_not_fail_the_followers() -> None:
    slow = Slow()
    invoker = Invoker(ToolRegistry([slow.tool]), None, NoOpTracer())
    [leader] = await fire(invoker, [Call("slow_lookup", {"q": 1})])
    followers = await fire(invoker, [Call("slow_lookup", {"q": 1})] * 3)
    leader.cancel()
    await asyncio.sleep(0)
    slow.gate.set()
    outcomes = await asyncio.gather(*followers)
    assert all(o.status == SUCCEEDED for o in outcomes) and slow.runs == 1
    with pytest.raises(asyncio.CancelledError):
        await leader
