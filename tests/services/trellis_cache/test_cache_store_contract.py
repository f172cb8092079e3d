"""The ``Store`` contract, run against both backends: in-memory and a real redis-server.

Whatever ``TRELLIS_REDIS_URL`` says, the servicer must see the same behaviour: round
trip with remaining TTL, expiry, invalidation by key, by tag and by tag group (entries
carrying every tag of a group), overwrite semantics, stats. Real time with short TTLs,
because Redis expires on its own clock.
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


async def test_invalidate_by_tag_group_takes_entries_carrying_every_tag(store: Store) -> None:
    await store.set("acme-a", b"1", ttl=60, tags=["tool:r", "tenant:acme", "arg:a"])
    await store.set("acme-b", b"2", ttl=60, tags=["tool:r", "tenant:acme", "arg:b"])
    await store.set("beta-a", b"3", ttl=60, tags=["tool:r", "tenant:beta", "arg:a"])
    await store.set("acme-other", b"4", ttl=60, tags=["tool:o", "tenant:acme", "arg:a"])
    removed = await store.invalidate(groups=[["tool:r", "tenant:acme", "arg:a"]])
    assert removed == 1
    assert await store.get("acme-a") is None
    for kept in ("acme-b", "beta-a", "acme-other"):
        assert await store.get(kept) is not None, kept
    # groups are OR-ed; an entry two groups match counts once; a tag nobody has matches none
    groups = [["tool:r", "tenant:acme"], ["tool:r", "arg:b"], ["tool:r", "unknown"]]
    assert await store.invalidate(groups=groups) == 1  # acme-b
    assert await store.invalidate(groups=[["tool:r"]]) == 1  # beta-a
    assert (await store.stats()).entries == 1


async def test_tag_group_skips_an_entry_set_anew_without_the_tags(store: Store) -> None:
    await store.set("k", b"1", ttl=60, tags=["tool:r", "arg:a"])
    await store.set("k", b"2", ttl=60, tags=["tool:r", "arg:b"])
    assert await store.invalidate(groups=[["tool:r", "arg:a"]]) == 0
    assert await store.invalidate(groups=[["tool:r", "arg:b"]]) == 1


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
