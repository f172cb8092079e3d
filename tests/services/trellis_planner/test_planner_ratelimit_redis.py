"""Model rate limits in a real Redis: one atomic Lua script shared by every replica, and
fail-open to in-process buckets when Redis dies or hangs.

The last test runs two real ``python -m trellis_planner`` processes over one Redis and
checks that together they send the model no more than the limit allows."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the fixture's types (tests/conftest.py)
    from conftest import ServiceProcess

import asyncio
import time
import uuid

import pytest
from structlog.testing import capture_logs

from trellis.clients.planner import PlannerClient
from trellis.planner.v1 import planner_pb2
from trellis.runtime.errors import ResourceExhausted
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings
from trellis_planner.ratelimit import Decision, Limit, RateLimits, RedisRateLimiter
from trellis_planner.service import SERVICE_NAME, make_rate_limits
from trellis_planner.settings import PlannerSettings

DEMO = "Report this machine's OS, disk usage and uptime"
STARTUP_TIMEOUT = 30.0


def unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def limiters(redis_server):
    """Two limiters on separate clients and connection pools: like two replicas."""
    made = [RedisRateLimiter.from_url(redis_server.url, retry_seconds=0) for _ in range(2)]
    yield made
    for limiter in made:
        await limiter.aclose()


async def test_replicas_share_the_buckets(limiters):
    first, second = limiters
    model, limit = unique(), Limit(requests=2, tokens=1000)
    assert await first.reserve(model, 400, limit, max_wait=0) == Decision(True, 0.0)
    assert await second.reserve(model, 400, limit, max_wait=0) == Decision(True, 0.0)
    refused = await first.reserve(model, 10, limit, max_wait=1)
    assert not refused.granted and 29 < refused.wait <= 30  # requests: one every 30 s
    reserved = await second.reserve(model, 10, limit, max_wait=60)  # waits its turn
    assert reserved.granted and 29 < reserved.wait <= 30
    queued = await first.reserve(model, 10, limit, max_wait=100)
    assert queued.granted and 59 < queued.wait <= 60  # behind the first waiter
    assert (await second.reserve(unique(), 10, limit, max_wait=0)).granted  # per model


async def test_tokens_bucket_and_both_or_neither(limiters):
    first, second = limiters
    model, limit = unique(), Limit(requests=2, tokens=600)  # 10 tokens/s
    assert (await first.reserve(model, 500, limit, max_wait=0)).granted
    refused = await second.reserve(model, 200, limit, max_wait=1)
    assert not refused.granted and 9.9 < refused.wait <= 10
    assert (await second.reserve(model, 100, limit, max_wait=0)).granted  # the request is left
    refused = await first.reserve(model, 1, limit, max_wait=0)
    assert not refused.granted and 29.9 < refused.wait <= 30


async def test_bucket_keys_share_a_hash_tag_and_expire(limiters):
    limiter = limiters[0]
    model, limit = unique(), Limit(requests=10, tokens=1000)
    await limiter.reserve(model, 100, limit, max_wait=0)
    keys = sorted(k.decode() for k in await limiter.client.keys(f"trellis:ratelimit:{{{model}}}:*"))
    assert keys == [
        f"trellis:ratelimit:{{{model}}}:requests",
        f"trellis:ratelimit:{{{model}}}:tokens",
    ]
    for key in keys:
        assert 0 < await limiter.client.pttl(key) <= 61_000  # gone once full again


async def test_redis_down_fails_open_to_in_process_then_recovers(limiters, redis_server):
    limiter = limiters[0]
    model, limit = unique(), Limit(requests=1)
    assert (await limiter.reserve(model, 1, limit, max_wait=0)).granted  # in Redis
    redis_server.stop()
    with capture_logs() as events:
        started = time.monotonic()
        # The in-process buckets start full: planning goes on, limited per process.
        assert (await limiter.reserve(model, 1, limit, max_wait=0)).granted
        assert not (await limiter.reserve(model, 1, limit, max_wait=0)).granted
        assert time.monotonic() - started < 2
    warnings = [e for e in events if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "redis unavailable" in warnings[0]["event"]
    redis_server.start()  # back, empty
    with capture_logs() as events:
        assert (await limiter.reserve(model, 1, limit, max_wait=0)).granted  # shared again
        assert not (await limiters[1].reserve(model, 1, limit, max_wait=0)).granted
    assert any("available again" in e["event"] for e in events)


async def test_hung_redis_does_not_hold_the_call(redis_server):
    limiter = RedisRateLimiter.from_url(redis_server.url, retry_seconds=30)
    limits = RateLimits(limiter, default=Limit(requests=5))
    try:
        await limits.admit("m", 1, max_wait=0)  # connected
        redis_server.pause()
        started = time.monotonic()
        assert await limits.admit("m", 1, max_wait=0) == 0  # falls open within ~2 timeouts
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        assert await limits.admit("m", 1, max_wait=0) == 0  # Redis is not retried for a while
        assert time.monotonic() - started < 0.05
    finally:
        redis_server.resume()
        await limiter.aclose()


def test_redis_url_selects_the_shared_limiter(redis_server) -> None:
    limits = make_rate_limits(PlannerSettings(redis_url=redis_server.url, model_rpm=1))
    assert limits.limiter.backend == "redis"


# --- two planner processes over one Redis -----------------------------------------------


async def test_two_planner_processes_share_the_limit_through_redis(
    redis_server, model, serve, channels, tools, service_process, tmp_path
):
    rpm = 3
    costs = await serve(
        "costs",
        build_costs,
        CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{tmp_path}/ledger.db"),
    )
    env = {
        "OPENAI_BASE_URL": model.base_url,
        "TRELLIS_REDIS_URL": redis_server.url,
        "TRELLIS_MODEL_RPM": str(rpm),
        "TRELLIS_COSTS_TARGET": costs.target,
    }
    planners = [
        service_process("trellis_planner", f"planner-{i}", SERVICE_NAME, env) for i in range(2)
    ]
    await asyncio.gather(*(p.wait_serving(STARTUP_TIMEOUT) for p in planners))

    async def plan(planner: ServiceProcess, i: int):
        client = PlannerClient(channels.get(planner.target), timeout=3)
        request = planner_pb2.PlanRequest(run_id=f"run-{i}", goal=DEMO, tools=tools)
        return [event async for event in client.plan(request)]

    # Alone, each process would let 3 through (6 in all); sharing Redis, 3 in all.
    outcomes = await asyncio.gather(
        *(plan(planners[i % 2], i) for i in range(8)), return_exceptions=True
    )
    done = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    assert len(done) == rpm, [repr(o) for o in outcomes if not isinstance(o, list)]
    assert all(events[-1].WhichOneof("event") == "done" for events in done)
    assert len(refused) == 8 - rpm
    for error in refused:
        assert error.reason == "MODEL_RATE_LIMITED"
        assert error.metadata["limiter"] == "redis"
        assert 3 < error.retry_delay <= 60  # the next free request is beyond the deadline
    assert len(model.requests) == rpm
