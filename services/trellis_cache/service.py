"""Wires the cache core and servicer into a server (standalone or embedded)."""

from __future__ import annotations

from grpc import aio

from trellis.cache.v1 import cache_pb2, cache_pb2_grpc
from trellis.runtime.channels import Channels
from trellis.runtime.server import Service
from trellis.runtime.telemetry import Telemetry
from trellis_cache.servicer import CacheServicer
from trellis_cache.settings import CacheSettings
from trellis_cache.store import MemoryStore

NAME = "cache"
SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


async def build(settings: CacheSettings, telemetry: Telemetry, channels: Channels) -> Service:
    store = MemoryStore(max_entries=settings.cache_max_entries, max_bytes=settings.cache_max_bytes)
    servicer = CacheServicer(store, settings.cache_default_ttl_seconds)

    def register(server: aio.Server) -> None:
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)

    return Service(NAME, [SERVICE_NAME], register)
