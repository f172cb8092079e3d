"""MemoryStore: LRU order, TTL expiry, byte bound, tags, stats."""

from trellis_cache.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(max_entries: int = 10, max_bytes: int = 1000) -> tuple[MemoryStore, Clock]:
    clock = Clock()
    return MemoryStore(max_entries=max_entries, max_bytes=max_bytes, clock=clock), clock


async def test_get_returns_value_and_remaining_ttl() -> None:
    store, clock = make()
    await store.set("k", b"v", ttl=10)
    clock.now += 4
    assert await store.get("k") == (b"v", 6)


async def test_expired_entry_is_a_miss_and_removed() -> None:
    store, clock = make()
    await store.set("k", b"v", ttl=10)
    clock.now += 10
    assert await store.get("k") is None
    assert (await store.stats()).entries == 0
    assert (await store.stats()).misses == 1


async def test_least_recently_used_is_evicted_first() -> None:
    store, _ = make(max_entries=2)
    await store.set("a", b"1", ttl=60)
    await store.set("b", b"2", ttl=60)
    await store.get("a")  # a is now more recent than b
    await store.set("c", b"3", ttl=60)
    assert await store.get("b") is None
    assert await store.get("a") is not None and await store.get("c") is not None
    assert (await store.stats()).evictions == 1


async def test_byte_bound_evicts_and_oversized_value_is_not_stored() -> None:
    store, _ = make(max_bytes=10)
    await store.set("a", b"x" * 6, ttl=60)
    await store.set("b", b"y" * 6, ttl=60)
    assert await store.get("a") is None
    assert (await store.stats()).bytes == 6
    await store.set("huge", b"z" * 11, ttl=60)
    assert await store.get("huge") is None
    assert await store.get("b") is not None


async def test_invalidate_by_key_and_tag() -> None:
    store, _ = make()
    await store.set("a", b"1", ttl=60, tags=["tool:x"])
    await store.set("b", b"2", ttl=60, tags=["tool:x", "tenant:t"])
    await store.set("c", b"3", ttl=60)
    assert await store.invalidate(tags=["tool:x"]) == 2
    assert await store.invalidate(keys=["c", "missing"]) == 1
    assert (await store.stats()).entries == 0


async def test_overwrite_replaces_value_and_tags() -> None:
    store, _ = make()
    await store.set("a", b"1", ttl=60, tags=["old"])
    await store.set("a", b"22", ttl=60, tags=["new"])
    assert await store.invalidate(tags=["old"]) == 0
    assert await store.get("a") == (b"22", 60)
    assert (await store.stats()).bytes == 2
