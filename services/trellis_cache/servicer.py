"""CacheService over gRPC: protos in, ``Store`` calls, protos out.

The servicer does not care which backend it serves; a backend failure is the
backend's ``Unavailable`` (reason CACHE_BACKEND_UNAVAILABLE), which the runtime's
interceptor sends as UNAVAILABLE so the gateway falls back to running the tool.
A Get marks its RPC's server span with ``trellis.cache_hit``. Keys and tags follow
``trellis.runtime.validation.CACHE_KEY`` (INVALID_ID otherwise; an empty key is
KEY_REQUIRED, an Invalidate tag group without tags TAG_GROUP_EMPTY).
"""

from __future__ import annotations

from collections.abc import Iterable

from grpc import aio
from opentelemetry import trace

from trellis.cache.v1 import cache_pb2, cache_pb2_grpc
from trellis.runtime.convert import duration, seconds
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis.runtime.metrics import CACHE_REQUESTS
from trellis.runtime.validation import CACHE_KEY, Problems
from trellis_cache.store import Store

#: Span attribute on a Get's server span (the name the gateway's execute_tool uses too).
ATTR_CACHE_HIT = "trellis.cache_hit"


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, store: Store, default_ttl: float) -> None:
        self._store = store
        self._default_ttl = default_ttl

    async def Get(
        self, request: cache_pb2.GetRequest, context: aio.ServicerContext
    ) -> cache_pb2.GetResponse:
        _require_key(request.key)
        _check_keys([("key", request.key)])
        found = await self._store.get(request.key)
        CACHE_REQUESTS.labels(result="hit" if found else "miss").inc()
        trace.get_current_span().set_attribute(ATTR_CACHE_HIT, found is not None)
        if found is None:
            return cache_pb2.GetResponse(found=False)
        value, ttl_left = found
        return cache_pb2.GetResponse(found=True, value=value, ttl_remaining=duration(ttl_left))

    async def Set(
        self, request: cache_pb2.SetRequest, context: aio.ServicerContext
    ) -> cache_pb2.SetResponse:
        _require_key(request.key)
        _check_keys([("key", request.key), *_indexed("tags", request.tags)])
        ttl = seconds(request.ttl) or self._default_ttl
        if ttl < 0:
            raise InvalidArgument(
                "ttl must not be negative", violations=[FieldViolation("ttl", "must be >= 0")]
            )
        await self._store.set(request.key, request.value, ttl, list(request.tags))
        return cache_pb2.SetResponse()

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: aio.ServicerContext
    ) -> cache_pb2.InvalidateResponse:
        _check_keys(
            [
                *_indexed("keys", request.keys),
                *_indexed("tags", request.tags),
                *(
                    pair
                    for i, group in enumerate(request.groups)
                    for pair in _indexed(f"groups[{i}].tags", group.tags)
                ),
            ]
        )
        empty = [i for i, group in enumerate(request.groups) if not group.tags]
        if empty:
            raise InvalidArgument(
                "a tag group must name at least one tag (an empty group would match everything)",
                reason="TAG_GROUP_EMPTY",
                violations=[FieldViolation(f"groups[{i}].tags", "empty") for i in empty],
            )
        invalidated = await self._store.invalidate(
            list(request.keys),
            list(request.tags),
            [list(group.tags) for group in request.groups],
        )
        return cache_pb2.InvalidateResponse(invalidated=invalidated)

    async def GetStats(
        self, request: cache_pb2.GetStatsRequest, context: aio.ServicerContext
    ) -> cache_pb2.GetStatsResponse:
        s = await self._store.stats()
        return cache_pb2.GetStatsResponse(
            hits=s.hits,
            misses=s.misses,
            entries=s.entries,
            evictions=s.evictions,
            bytes=s.bytes,
            backend=self._store.backend,
        )


def _require_key(key: str) -> None:
    if not key:
        raise InvalidArgument(
            "key is required", reason="KEY_REQUIRED", violations=[FieldViolation("key", "empty")]
        )


def _indexed(field: str, values: Iterable[str]) -> list[tuple[str, str]]:
    return [(f"{field}[{i}]", value) for i, value in enumerate(values)]


def _check_keys(named: Iterable[tuple[str, str]]) -> None:
    """INVALID_ID naming every ``(field, key or tag)`` that breaks ``CACHE_KEY``."""
    problems = Problems()
    for name, value in named:
        problems.check_id(name, value, CACHE_KEY, required=True)
    problems.refuse("cache request")
