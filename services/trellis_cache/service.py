"""Wires the cache core and servicer into a server (standalone or embedded).

``TRELLIS_REDIS_URL`` chooses the backend: empty is the in-memory LRU (one replica's
own cache), a URL is Redis (shared by every replica). A Redis that is down at start-up
does not stop the service: it answers UNAVAILABLE per call, the gateway runs tools
uncached, and the service recovers when Redis is back. Health stays SERVING meanwhile,
so an outage of the shared Redis does not take every cache replica out of rotation.
"""

from __future__ import annotations

from grpc import aio

from trellis.cache.v1 import cache_pb2, cache_pb2_grpc
from trellis.runtime.channels import Channels
from trellis.runtime.errors import Unavailable
from trellis.runtime.logs import get_logger
from trellis.runtime.server import Service
from trellis.runtime.telemetry import Telemetry, instrument_redis
from trellis_cache.redis_store import RedisStore, redacted
from trellis_cache.servicer import CacheServicer
from trellis_cache.settings import CacheSettings
from trellis_cache.store import MemoryStore, Store

NAME = "cache"
SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name

log = get_logger(__name__)


async def make_store(settings: CacheSettings, telemetry: Telemetry) -> Store:
    """The backend ``settings`` ask for, Redis commands traced by ``telemetry``."""
    if not settings.redis_url:
        return MemoryStore(
            max_entries=settings.cache_max_entries, max_bytes=settings.cache_max_bytes
        )
    store = RedisStore.from_url(
        settings.redis_url,
        prefix=settings.cache_redis_prefix,
        timeout=settings.cache_redis_timeout_seconds,
    )
    url = redacted(settings.redis_url)
    try:  # before instrumenting: a start-up probe is not part of any request's trace
        await store.ping()
        await store.load_scripts()
        log.info("cache backend", backend="redis", url=url, prefix=settings.cache_redis_prefix)
    except Unavailable as error:
        log.warning("cache backend not reachable yet", backend="redis", url=url, error=str(error))
    instrument_redis(telemetry, store.client)
    return store


async def build(settings: CacheSettings, telemetry: Telemetry, channels: Channels) -> Service:
    store = await make_store(settings, telemetry)
    servicer = CacheServicer(store, settings.cache_default_ttl_seconds)

    def register(server: aio.Server) -> None:
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)

    return Service(NAME, [SERVICE_NAME], register, aclose=store.aclose)
