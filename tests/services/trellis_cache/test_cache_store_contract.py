"""The ``Store`` contract, run against both backends: in-memory and a real redis-server.

Whatever ``TRELLIS_REDIS_URL`` says, the servicer must see the same behaviour: round
trip with remaining TTL, expiry, invalidation by key and by tag, overwrite semantics,
stats. Real time with short TTLs, because Redis expires on its own clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from trellis_cache.redis_store import RedisStore
from trellis_cache.store import MemoryStore, Store


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "memory":
        backend = MemoryStore(max_entries=100, max_bytes=1_000_000)
    else:
        server = request.getfixturevalue("redis_server")
        backend = RedisStore.from_url(server.url, prefix="test:", timeout=1.0)
    yield backend
    await backend.aclose()


async def test_round_trip_returns_value_and_remaining_ttl(store: Store) -> None:
    await store.set("k", b"\x00binary\xff", ttl=60)
    found = await store.get("k")
    assert found is not None
    value, ttl_left = found
    assert value == b"\x00binary\xff"
    assert 59 < ttl_left <= 60


async def test_missing_key_is_a_miss(store: Store) -> None:
    assert await store.get("never-set") is None


async def test_entry_expires_after_its_ttl(store: Store) -> None:
    await store.set("short", b"v", ttl=0.2)
    await store.set("long", b"v", ttl=60)
    assert await store.get("short") is not None
    await asyncio.sleep(0.3)
    assert await store.get("short") is None
    assert await store.get("long") is not None
    assert (await store.stats()).entries == 1


async def test_invalidate_by_key_and_by_tag(store: Store) -> None:
    await store.set("a", b"1", ttl=60, tags=["tool:x"])
    await store.set("b", b"2", ttl=60, tags=["tool:x", "tenant:t"])
    await store.set("c", b"3", ttl=60, tags=["tenant:t"])
    await store.set("d", b"4", ttl=60)
    assert await store.invalidate(tags=["tool:x"]) == 2
    assert await store.get("a") is None and await store.get("b") is None
    assert await store.get("c") is not None
    assert await store.invalidate(keys=["d", "missing"]) == 1
    assert await store.invalidate(tags=["tenant:t", "unknown"]) == 1
    assert (await store.stats()).entries == 0


async def test_key_named_twice_counts_once(store: Store) -> None:
    await store.set("a", b"1", ttl=60, tags=["t"])
    assert await store.invalidate(keys=["a", "a"], tags=["t"]) == 1


async def test_overwrite_replaces_value_and_tags(store: Store) -> None:
    await store.set("a", b"1", ttl=60, tags=["old"])
    await store.set("a", b"22", ttl=60, tags=["new"])
    assert await store.invalidate(tags=["old"]) == 0
    found = await store.get("a")
    assert found is not None and found[0] == b"22"
    assert (await store.stats()).bytes == 2
    assert await store.invalidate(tags=["new"]) == 1


async def test_stats_count_hits_misses_entries_and_bytes(store: Store) -> None:
    await store.set("a", b"123", ttl=60)
    await store.set("b", b"45", ttl=60)
    await store.get("a")
    await store.get("a")
    await store.get("zzz")
    stats = await store.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (2, 1, 2, 5)
    assert stats.evictions == 0
