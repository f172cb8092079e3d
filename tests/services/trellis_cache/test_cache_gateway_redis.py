"""Tool gateway + cache service + a real Redis: caching across the stack, fail-open when
Redis dies, back to caching when it returns, and tenants that never share results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from trellis.clients.cache import CacheClient
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value, to_struct
from trellis.runtime.server import RunningServer, start_service
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cache.service import NAME as CACHE_NAME
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED


def arithmetic(expression: str, node_id: str = "n1") -> toolgateway_pb2.InvokeToolRequest:
    call = common_pb2.ToolCall(
        node_id=node_id, tool="arithmetic", args=to_struct({"expression": expression})
    )
    return toolgateway_pb2.InvokeToolRequest(call=call, run_id="run-1")


@pytest.fixture
async def cache_server(serve, redis_server) -> RunningServer:
    settings = CacheSettings(port=0, metrics_port=0, redis_url=redis_server.url)
    return await serve(CACHE_NAME, build_cache, settings)


@pytest.fixture
async def gateway(serve, channels, cache_server: RunningServer) -> ToolGatewayClient:
    settings = GatewaySettings(port=0, metrics_port=0, cache_target=cache_server.target)
    server = await serve(NAME, build, settings)
    return ToolGatewayClient(channels.get(server.target), timeout=10)


async def invoke(gateway: ToolGatewayClient, expression: str) -> common_pb2.NodeOutcome:
    outcome = await gateway.invoke(arithmetic(expression))
    assert outcome.status == SUCCEEDED, outcome.error
    return outcome


async def test_results_are_cached_in_redis(
    gateway: ToolGatewayClient, channels, cache_server: RunningServer
) -> None:
    first, second = await invoke(gateway, "6 * 7"), await invoke(gateway, "6 * 7")
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert from_value(second.output) == {"result": 42}
    stats = await CacheClient(channels.get(cache_server.target)).stats()
    assert (stats.backend, stats.entries, stats.hits) == ("redis", 1, 1)


async def test_gateway_fails_open_while_redis_is_down_and_caches_again_after(
    gateway: ToolGatewayClient, redis_server
) -> None:
    assert not (await invoke(gateway, "2 + 3")).cache_hit
    assert (await invoke(gateway, "2 + 3")).cache_hit

    redis_server.stop()
    for _ in range(2):
        started = time.perf_counter()
        outcome = await invoke(gateway, "2 + 3")
        assert time.perf_counter() - started < 2.0
        assert not outcome.cache_hit
        assert from_value(outcome.output) == {"result": 5}

    redis_server.start()  # empty: the first call fills the cache again
    assert not (await invoke(gateway, "2 + 3")).cache_hit
    assert (await invoke(gateway, "2 + 3")).cache_hit


async def test_two_tenants_never_see_each_others_results(
    gateway: ToolGatewayClient, channels, cache_server: RunningServer
) -> None:
    hits: dict[str, list[bool]] = {"tenant-a": [], "tenant-b": []}
    for tenant in ("tenant-a", "tenant-a", "tenant-b", "tenant-b"):
        with context.request_scope(tenant_id=tenant):  # sent as x-tenant-id
            outcome = await invoke(gateway, "7 * 6")
        hits[tenant].append(outcome.cache_hit)
    assert hits == {"tenant-a": [False, True], "tenant-b": [False, True]}
    stats = await CacheClient(channels.get(cache_server.target)).stats()
    assert stats.entries == 2  # one result per tenant, not one shared


@pytest.fixture
async def traced_stack(
    redis_server, channels
) -> AsyncIterator[tuple[ToolGatewayClient, InMemorySpanExporter]]:
    """Cache and gateway exporting to one in-memory exporter."""
    exporter = InMemorySpanExporter()
    processors = [SimpleSpanProcessor(exporter)]
    cache_settings = CacheSettings(port=0, metrics_port=0, redis_url=redis_server.url)
    cache = await start_service(cache_settings, CACHE_NAME, build_cache, span_processors=processors)
    gateway_settings = GatewaySettings(port=0, metrics_port=0, cache_target=cache.target)
    gateway = await start_service(gateway_settings, NAME, build, span_processors=processors)
    yield ToolGatewayClient(channels.get(gateway.target), timeout=10), exporter
    await gateway.stop(0)
    await cache.stop(0)


def _one(spans: list[ReadableSpan], service: str, kind: SpanKind, suffix: str) -> ReadableSpan:
    (span,) = [
        s
        for s in spans
        if s.resource.attributes["service.name"] == service
        and s.kind == kind
        and s.name.endswith(suffix)
    ]
    return span


def _parent_of(child: ReadableSpan, parent: ReadableSpan) -> bool:
    return (
        child.parent is not None
        and child.parent.span_id == parent.context.span_id
        and child.context.trace_id == parent.context.trace_id
    )


async def test_redis_spans_hang_under_the_cache_rpc_of_the_tool_call(traced_stack) -> None:
    gateway, exporter = traced_stack
    await invoke(gateway, "1 + 1")
    spans = list(exporter.get_finished_spans())
    invoke_span = _one(spans, NAME, SpanKind.SERVER, "ToolGatewayService/InvokeTool")
    cache_client = _one(spans, NAME, SpanKind.CLIENT, "CacheService/Get")
    cache_server = _one(spans, CACHE_NAME, SpanKind.SERVER, "CacheService/Get")
    assert cache_client.context.trace_id == invoke_span.context.trace_id
    assert _parent_of(cache_server, cache_client)
    redis_spans = [s for s in spans if s.attributes and s.attributes.get("db.system") == "redis"]
    assert any(_parent_of(s, cache_server) for s in redis_spans)
    assert {s.context.trace_id for s in redis_spans} == {invoke_span.context.trace_id}


async def _spans_until(exporter: InMemorySpanExporter, name_suffix: str) -> list[ReadableSpan]:
    """The finished spans once one named ``...name_suffix`` is among them (the gateway
    writes the cache after answering, so a Set may end after the call returned)."""
    deadline = time.monotonic() + 5
    while not any(s.name.endswith(name_suffix) for s in exporter.get_finished_spans()):
        assert time.monotonic() < deadline, f"no {name_suffix} span within 5s"
        await asyncio.sleep(0.01)
    return list(exporter.get_finished_spans())


async def test_cache_spans_say_hit_or_miss_and_the_first_request_has_no_redis_error(
    traced_stack,
) -> None:
    """The Get's server span carries ``trellis.cache_hit``, and the Lua scripts were
    loaded at start-up, so the very first Get and Set run EVALSHA once each instead of
    a NOSCRIPT error span, SCRIPT LOAD and a retry."""
    gateway, exporter = traced_stack
    await invoke(gateway, "3 * 3")
    first = await _spans_until(exporter, "CacheService/Set")
    exporter.clear()
    await invoke(gateway, "3 * 3")
    second = list(exporter.get_finished_spans())
    gets = [
        _one(spans, CACHE_NAME, SpanKind.SERVER, "CacheService/Get") for spans in (first, second)
    ]
    assert [s.attributes["trellis.cache_hit"] for s in gets] == [False, True]
    redis_spans = [s for s in first if s.attributes and s.attributes.get("db.system") == "redis"]
    assert [s.name for s in redis_spans] == ["EVALSHA", "EVALSHA"]  # Get, then Set
    assert all(s.status.is_ok for s in redis_spans)
