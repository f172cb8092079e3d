"""The gateway's idempotency store, in memory and in a real Redis (``redis_server``).

The contract both keep: one claim per key, the first outcome replayed, a released key
claimable again, a key reused with other arguments refused, and an abandoned key (its
owner stopped mid-call) answered ``OutcomeUnknown`` forever after: at most once.
Redis adds what one process cannot: the keys outlive a gateway restart and are shared
by replicas, a claim is a lease renewed while the call runs, a claim whose lease ran
out without an outcome (the owner's process died) reads as unknown, and Redis down
fails side-effecting calls closed (``UNAVAILABLE``) while other tools go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from opentelemetry.trace import NoOpTracer
from pydantic import ValidationError

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value
from trellis.runtime.errors import Unavailable
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.policy.idempotency import (
    IdempotencyStore,
    KeyConflict,
    MemoryIdempotencyStore,
    OutcomeUnknown,
    StoreUnavailable,
)
from trellis_toolgateway.redis_idempotency import RedisIdempotencyStore, open_idempotency_store
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.settings import GatewaySettings
from trellis_toolgateway.tools.base import FunctionTool, Spec

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
DAY = 24 * 3600.0
#: Short leases keep the "owner died" tests fast.
LEASE = 0.3


def redis_store(url: str, *, lease: float = LEASE, timeout: float = 0.25) -> RedisIdempotencyStore:
    return RedisIdempotencyStore.from_url(url, timeout=timeout, lease=lease)


@pytest.fixture
async def stores(redis_server) -> AsyncIterator[list[RedisIdempotencyStore]]:
    """Redis stores made by ``make_store``; closed after the test."""
    made: list[RedisIdempotencyStore] = []
    yield made
    for store in made:
        await store.aclose()


@pytest.fixture
def make_store(redis_server, stores):
    """``make_store()``: one more gateway process's view of the shared Redis."""

    def make(**kw: float) -> RedisIdempotencyStore:
        stores.append(redis_store(redis_server.url, **kw))
        return stores[-1]

    return make


@pytest.fixture(params=["memory", "redis"])
def store(request) -> IdempotencyStore:
    if request.param == "memory":
        return MemoryIdempotencyStore()
    return request.getfixturevalue("make_store")()


# -- the contract, in both stores ------------------------------------------------------


async def test_one_claim_and_the_first_outcome_is_replayed(store: IdempotencyStore) -> None:
    assert await store.claim("k", "fp", 60)
    assert not await store.claim("k", "fp", 60)
    waiter = asyncio.create_task(store.wait("k"))
    await asyncio.sleep(0.1)
    assert not waiter.done()  # the first call still runs
    await store.complete("k", b"first")
    assert await asyncio.wait_for(waiter, 2) == b"first"
    assert await store.wait("k") == b"first"
    assert not await store.claim("k", "fp", 60)


async def test_a_released_key_can_be_claimed_again(store: IdempotencyStore) -> None:
    assert await store.claim("k", "fp", 60)
    waiter = asyncio.create_task(store.wait("k"))
    await asyncio.sleep(0.05)
    await store.release("k")
    assert await asyncio.wait_for(waiter, 2) is None
    assert await store.claim("k", "fp", 60)


async def test_a_key_reused_with_other_arguments_is_a_conflict(store: IdempotencyStore) -> None:
    assert await store.claim("k", "fp", 60)
    with pytest.raises(KeyConflict):
        await store.claim("k", "other", 60)
    await store.complete("k", b"done")
    with pytest.raises(KeyConflict):
        await store.claim("k", "other", 60)


async def test_an_abandoned_key_is_unknown_forever_after(store: IdempotencyStore) -> None:
    assert await store.claim("k", "fp", 60)
    waiter = asyncio.create_task(store.wait("k"))
    await asyncio.sleep(0.05)
    await store.abandon("k")  # stopped mid-call: the effect may have happened
    with pytest.raises(OutcomeUnknown):
        await asyncio.wait_for(waiter, 2)
    assert not await store.claim("k", "fp", 60)  # never claimable again (until its TTL)
    with pytest.raises(OutcomeUnknown):
        await store.wait("k")


# -- Redis: leases, TTLs, a dead owner, Redis down ---------------------------------------


async def test_a_dead_owners_claim_reads_unknown_once_its_lease_runs_out(make_store) -> None:
    owner, other = make_store(), make_store()
    assert await owner.claim("k", "fp", DAY)
    await owner.aclose()  # the owner's process dies: no outcome, no more renewals
    assert not await other.claim("k", "fp", DAY)
    started = time.monotonic()
    with pytest.raises(OutcomeUnknown):
        await asyncio.wait_for(other.wait("k"), 5)
    assert time.monotonic() - started <= LEASE + 0.5  # bounded by the lease, not the TTL
    assert not await other.claim("k", "fp", DAY)  # and it never runs again


async def test_a_running_claim_is_renewed_past_its_lease(make_store) -> None:
    owner, other = make_store(), make_store()
    assert await owner.claim("k", "fp", DAY)
    waiter = asyncio.create_task(other.wait("k"))
    await asyncio.sleep(LEASE * 4)  # four leases: renewed every third of one
    assert not waiter.done()
    assert owner.owned == 1
    await owner.complete("k", b"late but known")
    assert await asyncio.wait_for(waiter, 2) == b"late but known"
    assert owner.owned == 0  # renewal stopped with the outcome


async def test_keys_outlive_the_process_and_expire_after_their_ttl(
    make_store, redis_server
) -> None:
    first = make_store()
    assert await first.claim("k", "fp", 0.6)
    await first.complete("k", b"done")
    await first.aclose()
    restarted = make_store()  # a new gateway process: nothing in memory
    assert not await restarted.claim("k", "fp", 0.6)
    assert await restarted.wait("k") == b"done"
    ttl_ms = await restarted.client.pttl("trellis:idem:{k}")
    assert 0 < ttl_ms <= 600
    await asyncio.sleep(0.7)
    assert await restarted.claim("k", "fp", 0.6)  # forgotten after the TTL


async def test_a_stale_owner_cannot_overwrite_a_new_claim(make_store) -> None:
    stale, fresh = make_store(), make_store()
    assert await stale.claim("k", "fp", DAY)
    await fresh.client.delete("trellis:idem:{k}", "trellis:idem:{k}:lease")  # an operator
    assert await fresh.claim("k", "fp", DAY)
    await stale.complete("k", b"stale")  # refused: not the owner any more
    await fresh.complete("k", b"fresh")
    assert await stale.wait("k") == b"fresh"


async def test_redis_down_is_store_unavailable_quickly(make_store, redis_server) -> None:
    store = make_store()
    assert await store.claim("up", "fp", DAY)
    redis_server.stop()
    for operation in (store.claim("k", "fp", DAY), store.wait("up"), store.complete("up", b"x")):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await operation
        assert time.monotonic() - started < 2.0
    redis_server.start()  # empty: what was stored is gone (run Redis with AOF)
    assert await store.claim("k", "fp", DAY)


def test_settings_choose_the_store_and_check_the_url() -> None:
    assert isinstance(open_idempotency_store("", timeout=0.5), MemoryIdempotencyStore)
    assert GatewaySettings(redis_url="redis://127.0.0.1:1/0").redis_url.startswith("redis://")
    with pytest.raises(ValidationError, match="redis_url"):
        GatewaySettings(redis_url="http://127.0.0.1:6379")
    with pytest.raises(ValidationError, match="idempotency_lease_seconds"):
        GatewaySettings(idempotency_lease_seconds=0)


# -- the invoker over Redis: replicas, restarts, a gateway dying mid-call ----------------


class PostOrder:
    """A side-effecting tool: counts executions (at their start), answers after ``seconds``."""

    def __init__(
        self, *, seconds: float = 0.0, side_effects: bool = True, name: str = "post_order"
    ) -> None:
        self.seconds = seconds
        self.started: list[dict] = []
        self.tool = FunctionTool(
            Spec(
                name,
                "posts an order",
                {"type": "object"},
                {"type": "object"},
                side_effects=side_effects,
                retries=0,
            ),
            self._run,
        )

    async def _run(self, args: dict) -> dict:
        self.started.append(args)
        await asyncio.sleep(self.seconds)
        return {"order_id": len(self.started)}


def gateway(tool: PostOrder, store: IdempotencyStore) -> Invoker:
    """One gateway process's core over ``store``."""
    return Invoker(ToolRegistry([tool.tool]), None, NoOpTracer(), idempotency=store)


async def test_two_replicas_run_a_key_once(make_store) -> None:
    post = PostOrder(seconds=0.3)  # the same backend behind both replicas
    a, b = gateway(post, make_store()), gateway(post, make_store())
    call = Call("post_order", {"sku": "A1"}, node_id="n1")
    first, second = await asyncio.gather(
        a.invoke(call, idempotency_key="r1/n1"), b.invoke(call, idempotency_key="r1/n1")
    )
    assert len(post.started) == 1
    assert first.status == second.status == SUCCEEDED
    assert from_value(first.output) == from_value(second.output) == {"order_id": 1}


async def test_a_restarted_gateway_replays_the_stored_outcome(make_store) -> None:
    post = PostOrder()
    before = gateway(post, make_store())
    first = await before.invoke(Call("post_order", {}, node_id="n1"), idempotency_key="r/n1")
    after = gateway(post, make_store())  # the gateway restarted: its memory is gone
    again = await after.invoke(Call("post_order", {}, node_id="n1"), idempotency_key="r/n1")
    assert len(post.started) == 1
    assert again == first


async def test_a_retry_after_the_gateway_died_mid_call_fails_unknown_not_twice(
    make_store,
) -> None:
    post = PostOrder(seconds=30)
    dying_store = make_store()
    dying = gateway(post, dying_store)
    in_flight = asyncio.create_task(
        dying.invoke(Call("post_order", {}, node_id="n1"), idempotency_key="r/n1")
    )
    await asyncio.sleep(0.05)
    assert len(post.started) == 1  # the side effect is under way ...
    await dying_store.aclose()  # ... when the process dies (its lease stops renewing)
    survivor = gateway(post, make_store())
    started = time.monotonic()
    with context.request_scope(timeout=10):
        outcome = await survivor.invoke(
            Call("post_order", {}, node_id="n1"), idempotency_key="r/n1"
        )
    assert time.monotonic() - started <= LEASE + 0.5
    assert (outcome.status, outcome.error.code, outcome.error.retryable) == (
        FAILED,
        "IDEMPOTENCY_UNKNOWN",
        False,
    )
    assert (outcome.node_id, outcome.attempts) == ("n1", 0)
    assert len(post.started) == 1  # not run a second time
    in_flight.cancel()
    await asyncio.gather(in_flight, return_exceptions=True)


async def test_a_stopping_gateway_abandons_runs_still_going_after_its_grace(make_store) -> None:
    post = PostOrder(seconds=30)
    stopping = gateway(post, make_store())
    caller = asyncio.create_task(
        stopping.invoke(Call("post_order", {}, node_id="n1"), idempotency_key="r/n1")
    )
    await asyncio.sleep(0.05)
    caller.cancel()  # the executor went away; the run goes on in the background
    await asyncio.gather(caller, return_exceptions=True)
    await stopping.aclose(grace=0.1)  # the gateway stops: the run is cut short
    other = gateway(post, make_store())
    outcome = await other.invoke(Call("post_order", {}, node_id="n1"), idempotency_key="r/n1")
    assert outcome.error.code == "IDEMPOTENCY_UNKNOWN"  # at once: no lease to wait out
    assert len(post.started) == 1


async def test_a_stopping_gateway_lets_runs_finish_within_its_grace(make_store) -> None:
    post = PostOrder(seconds=0.1)
    stopping = gateway(post, make_store())
    caller = asyncio.create_task(
        stopping.invoke(Call("post_order", {}, node_id="n1"), idempotency_key="r/n1")
    )
    await asyncio.sleep(0.02)
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    await stopping.aclose(grace=5)
    other = gateway(post, make_store())
    outcome = await other.invoke(Call("post_order", {}, node_id="n1"), idempotency_key="r/n1")
    assert (outcome.status, from_value(outcome.output)) == (SUCCEEDED, {"order_id": 1})
    assert len(post.started) == 1


async def test_redis_down_fails_side_effects_closed_and_other_tools_run(
    make_store, redis_server
) -> None:
    post, lookup = PostOrder(), PostOrder(side_effects=False, name="lookup")
    invoker = Invoker(
        ToolRegistry([post.tool, lookup.tool]), None, NoOpTracer(), idempotency=make_store()
    )
    redis_server.stop()
    with pytest.raises(Unavailable) as raised:
        await invoker.invoke(Call("post_order", {}), idempotency_key="r/n1")
    assert raised.value.reason == "IDEMPOTENCY_STORE_UNAVAILABLE"
    assert post.started == []  # nothing ran: run-once could not be promised
    plain = await invoker.invoke(Call("lookup", {}), idempotency_key="r/n2")
    assert plain.status == SUCCEEDED  # no store needed
    redis_server.start()
    back = await invoker.invoke(Call("post_order", {}), idempotency_key="r/n1")
    assert back.status == SUCCEEDED and len(post.started) == 1
