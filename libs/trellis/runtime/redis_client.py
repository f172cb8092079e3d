"""Redis clients that fail fast: the one way services connect to Redis.

redis-py's defaults (5 s socket timeouts, 10 retries with backoff) would hold a call
for many seconds when Redis is down. Trellis uses Redis only where it can go on
without it (the cache: the gateway runs the tool; rate limits: per process), so a
call must fail within about ``2 * timeout``. One retry stays: it replaces a pooled
connection that Redis closed (restart, idle timeout) without the caller seeing an error.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff


def fail_fast_redis(url: str, *, timeout: float, client_name: str) -> redis.Redis:
    """A client for ``url`` whose every call fails within about ``2 * timeout``."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        decode_responses=False,
        client_name=client_name,
    )
