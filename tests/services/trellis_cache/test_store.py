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


def test_get_returns_value_and_remaining_ttl() -> None:
    store, clock = make()
    store.set("k", b"v", ttl=10)
    clock.now += 4
    assert store.get("k") == (b"v", 6)


def test_expired_entry_is_a_miss_and_removed() -> None:
    store, clock = make()
    store.set("k", b"v", ttl=10)
    clock.now += 10
    assert store.get("k") is None
    assert store.stats().entries == 0
    assert store.stats().misses == 1


def test_least_recently_used_is_evicted_first() -> None:
    store, _ = make(max_entries=2)
    store.set("a", b"1", ttl=60)
    store.set("b", b"2", ttl=60)
    store.get("a")  # a is now more recent than b
    store.set("c", b"3", ttl=60)
    assert store.get("b") is None
    assert store.get("a") is not None and store.get("c") is not None
    assert store.stats().evictions == 1


def test_byte_bound_evicts_and_oversized_value_is_not_stored() -> None:
    store, _ = make(max_bytes=10)
    store.set("a", b"x" * 6, ttl=60)
    store.set("b", b"y" * 6, ttl=60)
    assert store.get("a") is None
    assert store.stats().bytes == 6
    store.set("huge", b"z" * 11, ttl=60)
    assert store.get("huge") is None
    assert store.get("b") is not None


def test_invalidate_by_key_and_tag() -> None:
    store, _ = make()
    store.set("a", b"1", ttl=60, tags=["tool:x"])
    store.set("b", b"2", ttl=60, tags=["tool:x", "tenant:t"])
    store.set("c", b"3", ttl=60)
    assert store.invalidate(tags=["tool:x"]) == 2
    assert store.invalidate(keys=["c", "missing"]) == 1
    assert store.stats().entries == 0


def test_overwrite_replaces_value_and_tags() -> None:
    store, _ = make()
    store.set("a", b"1", ttl=60, tags=["old"])
    store.set("a", b"22", ttl=60, tags=["new"])
    assert store.invalidate(tags=["old"]) == 0
    assert store.get("a") == (b"22", 60)
    assert store.stats().bytes == 2
