"""The cache's storage interface (``Store``) and its embedded backend (``MemoryStore``).

The servicer only knows ``Store``; ``TRELLIS_REDIS_URL`` picks ``RedisStore``
(``trellis_cache.redis_store``) instead of the in-memory default. The interface is
async because a networked backend is; a backend that fails raises
``trellis.runtime.errors.Unavailable`` so callers (the gateway) can fail open.

``MemoryStore`` is written by hand (about a page) because no well-kept library
combines per-entry TTL, an entry *and* byte bound, and tag invalidation; cachetools'
TLRUCache covers the first only. Single-threaded by design: the service runs on one
asyncio loop and no method awaits, so each call is atomic.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class Store(Protocol):
    """Key/value results with TTL and tags; what ``CacheServicer`` serves."""

    #: Reported by GetStats ("memory", "redis").
    backend: str

    async def get(self, key: str) -> tuple[bytes, float] | None:
        """The value and its remaining TTL in seconds, or None on a miss."""
        ...

    async def set(self, key: str, value: bytes, ttl: float, tags: Iterable[str] = ()) -> None:
        """Store ``value`` for ``ttl`` seconds; an existing entry (and its tags) is replaced."""
        ...

    async def invalidate(
        self,
        keys: Iterable[str] = (),
        tags: Iterable[str] = (),
        groups: Iterable[Sequence[str]] = (),
    ) -> int:
        """Remove entries by key, by tag, and those carrying every tag of one of ``groups``
        (each non-empty); return how many were removed."""
        ...

    async def stats(self) -> Stats: ...

    async def aclose(self) -> None:
        """Release connections (the service calls it on shutdown)."""
        ...


@dataclass
class Entry:
    value: bytes
    expires_at: float
    tags: frozenset[str]


class MemoryStore:
    """Bounded by entries and bytes; least recently used entries go first."""

    backend = "memory"

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0

    async def get(self, key: str) -> tuple[bytes, float] | None:
        """The value and its remaining TTL, or None on a miss (expired counts as a miss)."""
        entry = self._entries.get(key)
        now = self._clock()
        if entry is None or entry.expires_at <= now:
            if entry is not None:
                self._remove(key)
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry.value, entry.expires_at - now

    async def set(self, key: str, value: bytes, ttl: float, tags: Iterable[str] = ()) -> None:
        if key in self._entries:
            self._remove(key)
        if len(value) > self._max_bytes:
            return  # can never fit; storing it would evict everything else
        entry = Entry(value, self._clock() + ttl, frozenset(tags))
        self._entries[key] = entry
        self._bytes += len(value)
        for tag in entry.tags:
            self._by_tag.setdefault(tag, set()).add(key)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self._evictions += 1

    async def invalidate(
        self,
        keys: Iterable[str] = (),
        tags: Iterable[str] = (),
        groups: Iterable[Sequence[str]] = (),
    ) -> int:
        """Remove entries by key, by tag and by tag group; return how many were removed."""
        doomed = {k for k in keys if k in self._entries}
        for tag in tags:
            doomed |= self._by_tag.get(tag, set())
        for group in groups:
            # Smallest set first: the intersection costs its size, not the largest's.
            members = sorted((self._by_tag.get(tag, set()) for tag in group), key=len)
            if members:
                doomed |= members[0].intersection(*members[1:])
        for key in doomed:
            self._remove(key)
        return len(doomed)

    async def stats(self) -> Stats:
        return Stats(self._hits, self._misses, self._evictions, len(self._entries), self._bytes)

    async def aclose(self) -> None:
        return None

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.value)
        for tag in entry.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]
