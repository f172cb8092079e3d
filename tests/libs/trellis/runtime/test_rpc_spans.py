"""RPC spans over real gRPC: names as the OpenTelemetry RPC conventions have them,
attributes of the caller's choosing on client spans, and bookkeeping calls (cost
accounting's run-time RPCs) that make no span unless they fail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc import aio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from trellis.runtime.channels import Channels
from trellis.runtime.errors import InvalidArgument
from trellis.runtime.interceptors import ServerRulesInterceptor
from trellis.runtime.ports import free_port
from trellis.runtime.rpc_spans import RpcKind, call_attributes, rpc_method

COSTS = "trellis.costs.v1.CostAccountingService"
CACHE = "trellis.cache.v1.CacheService"
RUN = "trellis.executor.v1.ExecutorService/Run"
FAIL = b"fail"


@pytest.mark.parametrize(
    ("path", "name", "kind"),
    [
        (f"/{CACHE}/Get", f"{CACHE}/Get", RpcKind.TRACED),
        (f"/{RUN}".encode(), RUN, RpcKind.TRACED),  # grpc.aio clients pass bytes
        (f"/{COSTS}/CheckBudget", f"{COSTS}/CheckBudget", RpcKind.BOOKKEEPING),
        (f"/{COSTS}/RecordUsage", f"{COSTS}/RecordUsage", RpcKind.BOOKKEEPING),
        (f"/{COSTS}/GetRunUsage", f"{COSTS}/GetRunUsage", RpcKind.BOOKKEEPING),
        (f"/{COSTS}/GetUsage", f"{COSTS}/GetUsage", RpcKind.TRACED),  # a person asks
        (f"/{COSTS}/SetBudget", f"{COSTS}/SetBudget", RpcKind.TRACED),
        ("/grpc.health.v1.Health/Check", "grpc.health.v1.Health/Check", RpcKind.UNTRACED),
        (b"/grpc.health.v1.Health/Watch", "grpc.health.v1.Health/Watch", RpcKind.UNTRACED),
    ],
)
def test_methods_are_named_without_a_leading_slash_and_kinded(
    path: str | bytes, name: str, kind: RpcKind
) -> None:
    method = rpc_method(path)
    assert (method.name, method.kind) == (name, kind)
    service, method_name = name.split("/")
    assert method.attributes["rpc.service"] == service
    assert method.attributes["rpc.method"] == method_name
    assert method.attributes["rpc.system"] == "grpc"


@dataclass
class _Mesh:
    """A server and a client, each with a tracer provider of its own."""

    target: str
    client: Channels
    client_spans: InMemorySpanExporter
    server_spans: InMemorySpanExporter
    caller: trace.Tracer

    def spans(self) -> list[ReadableSpan]:
        return [*self.client_spans.get_finished_spans(), *self.server_spans.get_finished_spans()]


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _handlers(server_tracer: trace.Tracer) -> grpc.GenericRpcHandler:
    async def answer(request: bytes, context: aio.ServicerContext) -> bytes:
        # work inside the handler: recorded only where the call is recorded
        with server_tracer.start_as_current_span("handler.work"):
            if request == FAIL:
                raise InvalidArgument("told to fail", reason="INVALID_ESTIMATE")
        return b"ok"

    def method(name: str) -> tuple[str, grpc.RpcMethodHandler]:
        return name, grpc.unary_unary_rpc_method_handler(answer)

    return grpc.method_handlers_generic_handler(
        COSTS, dict([method("CheckBudget"), method("GetUsage")])
    )


@pytest.fixture
async def mesh() -> AsyncIterator[_Mesh]:
    client_provider, client_spans = _provider()
    server_provider, server_spans = _provider()
    server_tracer = server_provider.get_tracer("server")
    server = aio.server(interceptors=[ServerRulesInterceptor(tracer=server_tracer)])
    server.add_generic_rpc_handlers((_handlers(server_tracer),))
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channels = Channels(tracer=client_provider.get_tracer("client"))
    try:
        yield _Mesh(
            f"127.0.0.1:{port}",
            channels,
            client_spans,
            server_spans,
            client_provider.get_tracer("caller"),
        )
    finally:
        await channels.close()
        await server.stop(None)


async def _call(channels: Channels, target: str, method: str, request: bytes) -> bytes:
    rpc = channels.get(target).unary_unary(f"/{COSTS}/{method}")
    return await rpc(request, timeout=5)


async def test_a_successful_bookkeeping_call_makes_no_span(mesh: _Mesh) -> None:
    with mesh.caller.start_as_current_span("caller"):
        assert await _call(mesh.client, mesh.target, "CheckBudget", b"go") == b"ok"
    # neither the call's spans nor what its handler did under it
    assert [s.name for s in mesh.spans()] == ["caller"]


async def test_a_failed_bookkeeping_call_makes_one_error_span_each_side(mesh: _Mesh) -> None:
    with mesh.caller.start_as_current_span("caller") as caller:
        with pytest.raises(grpc.RpcError):
            await _call(mesh.client, mesh.target, "CheckBudget", FAIL)
    name = f"{COSTS}/CheckBudget"
    (client,) = [s for s in mesh.client_spans.get_finished_spans() if s.name == name]
    (server,) = mesh.server_spans.get_finished_spans()  # no handler.work span
    caller_id = caller.get_span_context().span_id
    for span, kind in ((client, SpanKind.CLIENT), (server, SpanKind.SERVER)):
        assert span.name == name and span.kind == kind
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert span.context.trace_id == caller.get_span_context().trace_id
        assert span.parent is not None and span.parent.span_id == caller_id
        assert span.start_time < span.end_time
    assert "told to fail" in (server.status.description or "")


async def test_a_failed_bookkeeping_call_without_a_remote_parent_has_no_server_span(
    mesh: _Mesh,
) -> None:
    untraced = Channels()  # sends no trace context
    try:
        with pytest.raises(grpc.RpcError):
            await _call(untraced, mesh.target, "CheckBudget", FAIL)
    finally:
        await untraced.close()
    assert mesh.spans() == []


async def test_an_unreachable_bookkeeping_server_is_one_client_error_span() -> None:
    provider, exporter = _provider()
    channels = Channels(tracer=provider.get_tracer("client"))
    try:
        with pytest.raises(grpc.RpcError) as raised:
            await _call(channels, f"127.0.0.1:{free_port()}", "CheckBudget", b"go")
    finally:
        await channels.close()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    (span,) = exporter.get_finished_spans()
    assert (span.name, span.kind) == (f"{COSTS}/CheckBudget", SpanKind.CLIENT)
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_traced_calls_are_named_and_carry_the_callers_attributes(mesh: _Mesh) -> None:
    with mesh.caller.start_as_current_span("caller"):
        with call_attributes({"trellis.node_id": "n1", "gen_ai.tool.name": "echo"}):
            await _call(mesh.client, mesh.target, "GetUsage", b"go")
        await _call(mesh.client, mesh.target, "GetUsage", b"again")  # outside the block
    name = f"{COSTS}/GetUsage"
    clients = [s for s in mesh.client_spans.get_finished_spans() if s.name == name]
    servers = [s for s in mesh.server_spans.get_finished_spans() if s.name == name]
    assert len(clients) == len(servers) == 2
    assert [s.attributes.get("trellis.node_id") for s in clients] == ["n1", None]
    assert [s.attributes.get("gen_ai.tool.name") for s in clients] == ["echo", None]
    assert all("trellis.node_id" not in s.attributes for s in servers)
    assert {s.parent.span_id for s in servers if s.parent} == {s.context.span_id for s in clients}
    for span in (*clients, *servers):
        assert span.attributes["rpc.service"] == COSTS
        assert span.attributes["rpc.method"] == "GetUsage"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.status.status_code == StatusCode.UNSET
    assert {s.name for s in mesh.server_spans.get_finished_spans()} == {name, "handler.work"}
