"""CacheService with the Redis backend over real gRPC and a real redis-server.

The service keeps serving through a Redis outage (fast UNAVAILABLE with a stable
reason, health still SERVING) and recovers without a restart; replicas over one Redis
agree; every Redis command is a span under the RPC that caused it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from trellis.clients.cache import CacheClient
from trellis.runtime.errors import Unavailable
from trellis.runtime.server import RunningServer, start_service
from trellis_cache.service import NAME, build
from trellis_cache.settings import CacheSettings


def settings(redis_server, **kw) -> CacheSettings:
    return CacheSettings(port=0, metrics_port=0, redis_url=redis_server.url, **kw)


@pytest.fixture
async def server(serve, redis_server) -> RunningServer:
    return await serve(NAME, build, settings(redis_server))


@pytest.fixture
def cache(server: RunningServer, channels) -> CacheClient:
    return CacheClient(channels.get(server.target), timeout=5)


async def test_round_trip_invalidate_and_stats_report_redis(cache: CacheClient) -> None:
    assert await cache.get("k") is None
    await cache.set("k", b"value", ttl=60, tags=["tool:x"])
    await cache.set("j", b"other", ttl=60, tags=["tool:y"])
    assert await cache.get("k") == b"value"
    assert await cache.invalidate(tags=["tool:x"]) == 1
    assert await cache.get("k") is None
    assert await cache.get("j") == b"other"
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (2, 2, 1, 5)
    assert stats.backend == "redis"


async def test_replicas_over_one_redis_share_entries_and_stats(
    serve, redis_server, channels
) -> None:
    a = await serve(NAME, build, settings(redis_server))
    b = await serve(NAME, build, settings(redis_server))
    cache_a = CacheClient(channels.get(a.target))
    cache_b = CacheClient(channels.get(b.target))
    await cache_a.set("k", b"v", ttl=60)
    assert await cache_b.get("k") == b"v"
    assert await cache_a.get("missing") is None
    stats_a, stats_b = await cache_a.stats(), await cache_b.stats()
    assert stats_a == stats_b
    assert (stats_a.hits, stats_a.misses, stats_a.entries) == (1, 1, 1)


async def _unavailable_within(call, bound: float) -> Unavailable:
    started = time.perf_counter()
    with pytest.raises(Unavailable) as raised:
        await call
    assert time.perf_counter() - started < bound
    return raised.value


async def test_redis_outage_is_fast_unavailable_and_recovers_without_restart(
    cache: CacheClient, server: RunningServer, channels, redis_server
) -> None:
    await cache.set("k", b"v", ttl=60)
    redis_server.stop()
    for call in (cache.get("k"), cache.set("k", b"v2", ttl=60), cache.stats()):
        error = await _unavailable_within(call, bound=2.0)
        assert error.reason == "CACHE_BACKEND_UNAVAILABLE"
        assert error.metadata["backend"] == "redis"
    health = health_pb2_grpc.HealthStub(channels.get(server.target))
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    redis_server.start()  # same port, empty
    assert await cache.get("k") is None
    await cache.set("k", b"back", ttl=60)
    assert await cache.get("k") == b"back"


async def test_service_starts_while_redis_is_down_and_serves_once_it_is_up(
    serve, redis_server, channels
) -> None:
    redis_server.stop()
    running = await serve(NAME, build, settings(redis_server))
    cache = CacheClient(channels.get(running.target), timeout=5)
    await _unavailable_within(cache.get("k"), bound=2.0)
    redis_server.start()
    await cache.set("k", b"v", ttl=60)
    assert await cache.get("k") == b"v"


@pytest.fixture
async def traced(redis_server) -> AsyncIterator[tuple[RunningServer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    running = await start_service(
        settings(redis_server), NAME, build, span_processors=[SimpleSpanProcessor(exporter)]
    )
    yield running, exporter
    await running.stop(0)


def _server_span(spans: list[ReadableSpan], method: str) -> ReadableSpan:
    (span,) = [
        s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith(f"CacheService/{method}")
    ]
    return span


def _redis_children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.attributes
        and s.attributes.get("db.system") == "redis"
        and s.parent is not None
        and s.parent.span_id == parent.context.span_id
        and s.context.trace_id == parent.context.trace_id
    ]


async def test_redis_commands_are_spans_under_the_cache_server_span(traced, channels) -> None:
    running, exporter = traced
    cache = CacheClient(channels.get(running.target), timeout=5)
    await cache.set("k", b"v", ttl=60, tags=["t"])
    await cache.get("k")
    spans = list(exporter.get_finished_spans())

    for method in ("Set", "Get"):
        server_span = _server_span(spans, method)
        children = _redis_children(spans, server_span)
        assert children, f"no Redis span under {server_span.name}"
        assert all(c.kind == SpanKind.CLIENT for c in children)
        assert all(c.resource.attributes["service.name"] == NAME for c in children)
        assert any(c.name in ("EVALSHA", "EVAL") for c in children)
    redis_spans = [s for s in spans if s.attributes and s.attributes.get("db.system") == "redis"]
    assert all(s.parent is not None for s in redis_spans)  # no orphan (start-up) spans
