"""The gateway's ``ResultCache`` over the cache service's own ``MemoryStore``, in process.

What ``trellis.clients.cache.CacheClient`` does over gRPC, without the hop: tests of the
gateway's cache policy (invalidation, refresh-ahead, warming) run against the real store
(TTL, tags, tag groups) with a clock they move by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

from trellis_cache.store import MemoryStore


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StoreCache:
    """``ResultCache`` over a ``MemoryStore``; records the invalidations asked of it."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.store = MemoryStore(max_entries=10_000, max_bytes=64 << 20, clock=self.clock)
        self.invalidations: list[list[list[str]]] = []
        self.sets = 0

    async def get(self, key: str) -> bytes | None:
        found = await self.store.get(key)
        return found[0] if found else None

    async def entry(self, key: str) -> tuple[bytes, float] | None:
        return await self.store.get(key)

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None:
        self.sets += 1
        await self.store.set(key, value, ttl, tags)

    async def invalidate(
        self,
        keys: Sequence[str] = (),
        tags: Sequence[str] = (),
        groups: Sequence[Sequence[str]] = (),
    ) -> int:
        self.invalidations.append([list(g) for g in groups])
        return await self.store.invalidate(keys, tags, groups)

    async def entries(self) -> int:
        return (await self.store.stats()).entries
