"""RedisStore against a real redis-server: what only the shared backend has to get right.

Replicas agree (stats live in Redis), keys stay under their prefix, Redis does the
expiring, tag sets do not outlive their entries, and a Redis that dies and comes back
costs fast ``Unavailable`` errors in between, never a broken client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as redis

from trellis.runtime.errors import Unavailable
from trellis_cache.redis_store import RedisStore, redacted
from trellis_cache.store import Store

PREFIX = "t:cache:"


@pytest.fixture
async def raw(redis_server) -> AsyncIterator[redis.Redis]:
    """A plain client to look at what the store wrote."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def stores(redis_server) -> AsyncIterator[Callable[..., RedisStore]]:
    """``make(prefix=...)`` -> a RedisStore on the test's server (one per cache replica)."""
    made: list[RedisStore] = []

    def make(prefix: str = PREFIX, timeout: float = 0.25) -> RedisStore:
        store = RedisStore.from_url(redis_server.url, prefix=prefix, timeout=timeout)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


async def test_two_replicas_share_entries_and_stats(stores) -> None:
    a, b = stores(), stores()
    await a.set("k", b"v", ttl=60)
    assert await b.get("k") == (b"v", pytest.approx(60, abs=1))
    assert await a.get("k") is not None
    assert await b.get("other") is None
    stats_a, stats_b = await a.stats(), await b.stats()
    assert stats_a == stats_b
    assert (stats_a.hits, stats_a.misses, stats_a.entries) == (2, 1, 1)
    assert await b.invalidate(keys=["k"]) == 1
    assert await a.get("k") is None


async def test_prefixes_isolate_deployments_and_every_key_is_namespaced(stores, raw) -> None:
    blue, green = stores(prefix="blue:"), stores(prefix="green:")
    await blue.set("k", b"blue", ttl=60, tags=["t"])
    await blue.get("k")
    assert await green.get("k") is None
    assert await green.invalidate(keys=["k"], tags=["t"]) == 0
    assert (await green.stats()).entries == 0
    assert (await blue.stats()).entries == 1
    keys = sorted(k.decode() for k in await raw.keys("*"))
    assert keys == [
        "blue:entry:k",
        "blue:stats",
        "blue:tag:t",
        "green:stats",
    ]


async def test_prefix_with_glob_characters_counts_only_its_own_entries(stores) -> None:
    odd, plain = stores(prefix="a*["), stores(prefix="ab[")
    await plain.set("k", b"v", ttl=60)
    await odd.set("k", b"v", ttl=60)
    assert (await odd.stats()).entries == 1


async def test_redis_holds_the_ttl_and_tag_sets_cover_their_members(stores, raw) -> None:
    store = stores()
    await store.set("short", b"v", ttl=5, tags=["tool:x"])
    await store.set("long", b"v", ttl=50, tags=["tool:x"])
    await store.set("shorter", b"v", ttl=1, tags=["tool:x"])  # must not shorten the set
    assert 4_000 < await raw.pttl(f"{PREFIX}entry:short") <= 5_000
    assert 49_000 < await raw.pttl(f"{PREFIX}tag:tool:x") <= 50_000
    await store.get("short")
    assert await raw.pttl(f"{PREFIX}stats") == -1  # counters never expire


async def test_overwrite_leaves_no_membership_in_the_old_tag_set(stores, raw) -> None:
    store = stores()
    await store.set("k", b"1", ttl=60, tags=["old", "kept"])
    await store.set("k", b"2", ttl=60, tags=["new", "kept"])
    assert await raw.smembers(f"{PREFIX}tag:old") == set()
    assert await raw.smembers(f"{PREFIX}tag:kept") == {b"k"}
    assert await raw.smembers(f"{PREFIX}tag:new") == {b"k"}


async def test_stale_tag_membership_does_not_drop_an_entry_set_anew(stores) -> None:
    store = stores()
    await store.set("k", b"old", ttl=0.2, tags=["old-tag"])
    await store.set("keeper", b"v", ttl=60, tags=["old-tag"])  # keeps the tag set alive
    await asyncio.sleep(0.3)  # "k" expires in Redis; its membership of old-tag remains
    await store.set("k", b"new", ttl=60, tags=["new-tag"])
    assert await store.invalidate(tags=["old-tag"]) == 1  # keeper only
    found = await store.get("k")
    assert found is not None and found[0] == b"new"


async def test_evictions_are_the_ones_redis_made(stores, raw) -> None:
    await raw.config_set("maxmemory", 2 * 1024 * 1024)
    await raw.config_set("maxmemory-policy", "volatile-lru")
    store = stores()
    for i in range(200):
        await store.set(f"k{i}", b"x" * 20_000, ttl=60)
    stats = await store.stats()
    assert stats.evictions > 0
    # A snapshot: Redis may evict more between the SCAN and the size look-ups.
    assert 0 < stats.entries <= 200 - stats.evictions + 5
    assert 0 < stats.bytes <= 20_000 * stats.entries


async def _timed(call: Awaitable[object]) -> tuple[BaseException | None, float]:
    started = time.perf_counter()
    try:
        await call
    except Exception as error:
        return error, time.perf_counter() - started
    return None, time.perf_counter() - started


async def test_dead_redis_is_a_fast_unavailable_and_the_client_recovers(
    stores, redis_server
) -> None:
    store: Store = stores()
    await store.set("k", b"v", ttl=60, tags=["t"])
    redis_server.stop()
    for call in (
        store.get("k"),
        store.set("k", b"v2", ttl=60),
        store.invalidate(tags=["t"]),
        store.stats(),
    ):
        error, took = await _timed(call)
        assert isinstance(error, Unavailable), error
        assert error.reason == "CACHE_BACKEND_UNAVAILABLE"
        assert took < 1.0
    redis_server.start()  # an empty Redis: no data, no loaded scripts
    assert await store.get("k") is None
    await store.set("k", b"v3", ttl=60, tags=["t"])
    assert await store.get("k") == (b"v3", pytest.approx(60, abs=1))
    assert await store.invalidate(tags=["t"]) == 1
    assert (await store.stats()).misses == 1


async def test_hung_redis_is_bounded_by_the_socket_timeout(stores, redis_server) -> None:
    store = stores(timeout=0.2)
    await store.set("k", b"v", ttl=60)
    redis_server.pause()
    try:
        error, took = await _timed(store.get("k"))
    finally:
        redis_server.resume()
    assert isinstance(error, Unavailable) and error.reason == "CACHE_BACKEND_UNAVAILABLE"
    assert took < 1.0  # one try and one retry of 0.2 s each, plus a little backoff
    assert await store.get("k") == (b"v", pytest.approx(60, abs=1))


async def test_unreachable_redis_at_start_is_unavailable_not_a_hang(stores, redis_server) -> None:
    redis_server.stop()
    store = stores()
    error, took = await _timed(store.get("k"))
    assert isinstance(error, Unavailable) and error.reason == "CACHE_BACKEND_UNAVAILABLE"
    assert took < 1.0


def test_redacted_hides_credentials_only() -> None:
    assert redacted("redis://user:s3cret@cache:6379/0") == "redis://***@cache:6379/0"
    assert redacted("rediss://:s3cret@cache/1") == "rediss://***@cache/1"
    assert redacted("redis://cache:6379/0") == "redis://cache:6379/0"
