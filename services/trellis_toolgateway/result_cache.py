"""The gateway's use of the result cache, fail-open.

The cache exists to save time and money, so a cache that is down, slow or holding a
bad entry costs a warning, ``trellis_cache_requests_total{result="error"}`` and a span
event, never the call: a failed read is a miss, a failed write is dropped.

A result that contains a secret this process knows (``trellis.runtime.redact``: its
settings' secrets, HTTP tools' header secrets, ...) is never stored: it would outlive
the call and be served to every caller with the same arguments. It is returned to its
caller as usual; the skipped write costs a warning (without the value),
``trellis_cache_requests_total{result="secret"}`` and a span event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.runtime.errors import TrellisError
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import CACHE_REQUESTS
from trellis.runtime.redact import contains_secret

log = get_logger(__name__)

NodeOutcome = common_pb2.NodeOutcome
SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED


class ResultCache(Protocol):
    """What the invoker needs of a cache; ``trellis.clients.cache.CacheClient`` is one.

    ``entry`` (for tools with ``refresh_ahead``) and ``invalidate`` (for invalidation)
    are only called when those are used.
    """

    async def get(self, key: str) -> bytes | None: ...

    async def entry(self, key: str) -> tuple[bytes, float] | None: ...

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None: ...

    async def invalidate(
        self,
        keys: Sequence[str] = (),
        tags: Sequence[str] = (),
        groups: Sequence[Sequence[str]] = (),
    ) -> int: ...


class FailOpenCache:
    """Stored outputs of successful calls, read and written without ever failing a call."""

    def __init__(self, cache: ResultCache) -> None:
        self._cache = cache

    async def lookup(self, key: str, span: trace.Span) -> tuple[NodeOutcome | None, bool]:
        """The cached outcome (None on a miss) and whether the cache answered at all."""
        try:
            stored = await self._cache.get(key)
        except Exception as error:  # fail-open, see module docstring
            self.cache_failed("get", error, span)
            return None, False
        return self._decoded(stored, span), True

    async def lookup_entry(
        self, key: str, span: trace.Span
    ) -> tuple[NodeOutcome | None, float, bool]:
        """Like ``lookup``, with the entry's remaining TTL (seconds; 0 on a miss)."""
        try:
            found = await self._cache.entry(key)
        except Exception as error:  # fail-open
            self.cache_failed("get", error, span)
            return None, 0.0, False
        if found is None:
            return None, 0.0, True
        outcome = self._decoded(found[0], span)
        return outcome, found[1] if outcome is not None else 0.0, True

    async def invalidate(self, groups: Sequence[Sequence[str]]) -> int:
        """Remove the entries of ``groups``; how many went. Raises what the cache raised:
        whether that fails the caller is the caller's to decide."""
        return await self._cache.invalidate(groups=groups)

    def _decoded(self, stored: bytes | None, span: trace.Span) -> NodeOutcome | None:
        if stored is None:
            return None
        try:
            output = struct_pb2.Value.FromString(stored)
        except DecodeError as error:  # a bad entry: overwrite it with a fresh result
            self.cache_failed("decode", error, span)
            return None
        return NodeOutcome(status=SUCCEEDED, output=output, cache_hit=True)

    async def store(
        self, key: str, output: struct_pb2.Value, ttl: float, tags: list[str], span: trace.Span
    ) -> None:
        value = output.SerializeToString()
        if contains_secret(value):
            log.warning("result not cached: it contains a secret", tags=tags)
            CACHE_REQUESTS.labels(result="secret").inc()
            if span.is_recording():
                span.add_event("trellis.cache.skipped", {"trellis.cache.reason": "secret"})
            return
        try:
            await self._cache.set(key, value, ttl, tags)
        except Exception as error:  # fail-open
            self.cache_failed("set", error, span)

    @staticmethod
    def cache_failed(operation: str, error: Exception, span: trace.Span) -> None:
        """Log, count and mark on ``span`` a cache operation that failed (the call goes on)."""
        kind = error.reason if isinstance(error, TrellisError) else type(error).__name__
        log.warning(
            "cache failed; running without it", operation=operation, error=kind, message=str(error)
        )
        CACHE_REQUESTS.labels(result="error").inc()
        if span.is_recording():  # a write-behind may fail after the call's span ended
            span.add_event(
                "trellis.cache.error",
                {"trellis.cache.operation": operation, "error.type": kind, "message": str(error)},
            )
