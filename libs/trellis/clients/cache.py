"""Client of ``trellis.cache.v1.CacheService``."""

from __future__ import annotations

from collections.abc import Sequence

from grpc import aio

from trellis.cache.v1 import cache_pb2, cache_pb2_grpc
from trellis.runtime.convert import duration, seconds
from trellis.runtime.errors import translated_rpc_errors


class CacheClient:
    def __init__(self, channel: aio.Channel, *, timeout: float = 1.0) -> None:
        self._stub = cache_pb2_grpc.CacheServiceStub(channel)
        self._timeout = timeout

    async def get(self, key: str) -> bytes | None:
        with translated_rpc_errors():
            response = await self._stub.Get(cache_pb2.GetRequest(key=key), timeout=self._timeout)
        return response.value if response.found else None

    async def entry(self, key: str) -> tuple[bytes, float] | None:
        """The value and its remaining TTL in seconds, or None on a miss."""
        with translated_rpc_errors():
            response = await self._stub.Get(cache_pb2.GetRequest(key=key), timeout=self._timeout)
        return (response.value, seconds(response.ttl_remaining)) if response.found else None

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None:
        request = cache_pb2.SetRequest(key=key, value=value, ttl=duration(ttl), tags=tags)
        with translated_rpc_errors():
            await self._stub.Set(request, timeout=self._timeout)

    async def invalidate(
        self,
        keys: Sequence[str] = (),
        tags: Sequence[str] = (),
        groups: Sequence[Sequence[str]] = (),
    ) -> int:
        """Remove entries by key, by tag, and those carrying every tag of one of ``groups``;
        how many went."""
        request = cache_pb2.InvalidateRequest(
            keys=keys, tags=tags, groups=[cache_pb2.TagGroup(tags=group) for group in groups]
        )
        with translated_rpc_errors():
            response = await self._stub.Invalidate(request, timeout=self._timeout)
        return response.invalidated

    async def stats(self) -> cache_pb2.GetStatsResponse:
        with translated_rpc_errors():
            return await self._stub.GetStats(cache_pb2.GetStatsRequest(), timeout=self._timeout)
