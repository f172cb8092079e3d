"""Server bootstrap and interceptors over real gRPC: deadlines and tenants propagate,
limits hold, errors map, health and reflection answer, stop is graceful."""

import asyncio
import contextlib

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from trellis.runtime import context
from trellis.runtime.channels import MAX_RECONNECT_BACKOFF_MS, Channels
from trellis.runtime.convert import from_struct, from_value, to_value
from trellis.runtime.errors import (
    DeadlineExceeded,
    Internal,
    NotFound,
    ResourceExhausted,
    Unavailable,
    translated_rpc_errors,
)
from trellis.runtime.server import Service
from trellis.runtime.settings import ServiceSettings
from trellis.tools.v1 import tools_pb2, tools_pb2_grpc

SERVICE = tools_pb2.DESCRIPTOR.services_by_name["ToolServerService"].full_name


class Probe(tools_pb2_grpc.ToolServerServiceServicer):
    """Test servicer: reports what it sees, relays onward, sleeps or fails on request."""

    def __init__(self, channels, next_target: str | None) -> None:
        self._channels, self._next = channels, next_target
        self.calls = 0

    async def CallTool(self, request, ctx):
        args = from_struct(request.args)
        self.calls += 1
        if args.get("raise") == "unavailable":
            raise Unavailable("my dependency is down", reason="DEPENDENCY_DOWN")
        if args.get("sleep"):
            await asyncio.sleep(args["sleep"])
        if args.get("raise") == "not_found":
            raise NotFound("nothing here", reason="NOTHING")
        if args.get("raise") == "bug":
            raise RuntimeError("secret internals")
        if self._next:
            stub = tools_pb2_grpc.ToolServerServiceStub(self._channels.get(self._next))
            with translated_rpc_errors():
                return await stub.CallTool(tools_pb2.CallToolRequest(tool="x"), timeout=30)
        seen = {"remaining": context.remaining(), "tenant": context.tenant()}
        return tools_pb2.CallToolResponse(output=to_value(seen))


def probe(next_target: str | None = None, servicers: list | None = None):
    async def build(settings, telemetry, channels) -> Service:
        servicer = Probe(channels, next_target)
        if servicers is not None:
            servicers.append(servicer)
        return Service(
            "probe",
            [SERVICE],
            lambda server: tools_pb2_grpc.add_ToolServerServiceServicer_to_server(servicer, server),
        )

    return build


def settings(**kw) -> ServiceSettings:
    return ServiceSettings(**{"port": 0, "metrics_port": 0, **kw})


async def call(channels, target, deadline=5.0, **args):
    stub = tools_pb2_grpc.ToolServerServiceStub(channels.get(target))
    request = tools_pb2.CallToolRequest(tool="x")
    request.args.update(args)
    with translated_rpc_errors():
        response = await stub.CallTool(request, timeout=deadline)
    return from_value(response.output)


async def test_deadline_and_tenant_propagate_across_two_hops(serve, channels) -> None:
    last = await serve("last", probe(), settings())
    first = await serve("first", probe(last.target), settings())
    with context.request_scope(tenant_id="acme"):
        # generous: a loaded CI host once took > 2 s for the two cold hops
        seen = await call(channels, first.target, deadline=10.0)
    assert seen["tenant"] == "acme"
    # The caller's deadline, carried two hops: never extended (the 0.2 s allows for gRPC
    # core rounding the wire timeout up; an uncarried deadline would leave none at all).
    assert 0 < seen["remaining"] <= 10.2


async def test_expired_deadline_fails_before_calling(serve, channels) -> None:
    server = await serve("p", probe(), settings())
    with context.request_scope(timeout=0.0), pytest.raises(DeadlineExceeded):
        await call(channels, server.target)


async def test_domain_error_keeps_reason_and_bugs_become_internal(serve, channels) -> None:
    server = await serve("p", probe(), settings())
    method = f"/{SERVICE}/CallTool"

    def counted(code: str, reason: str) -> float:
        labels = {"method": method, "code": code, "reason": reason}
        return REGISTRY.get_sample_value("trellis_rpc_errors_total", labels) or 0.0

    before = counted("NOT_FOUND", "NOTHING"), counted("INTERNAL", "INTERNAL")
    with pytest.raises(NotFound) as raised:
        await call(channels, server.target, **{"raise": "not_found"})
    assert raised.value.reason == "NOTHING"
    with pytest.raises(Internal) as raised_internal:
        await call(channels, server.target, **{"raise": "bug"})
    assert "secret internals" not in raised_internal.value.message
    # Each error answered is counted by method, code and reason (trellis_rpc_errors_total).
    after = counted("NOT_FOUND", "NOTHING"), counted("INTERNAL", "INTERNAL")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


async def test_beyond_max_concurrent_rpcs_is_resource_exhausted(serve, channels) -> None:
    server = await serve("p", probe(), settings(max_concurrent_rpcs=1))
    results = await asyncio.gather(
        call(channels, server.target, sleep=0.5),
        call(channels, server.target, sleep=0.5),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ResourceExhausted) for r in results) == 1


async def test_health_and_reflection_list_the_service(serve, channels) -> None:
    server = await serve("p", probe(), settings())
    channel = channels.get(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_stop_turns_health_not_serving_and_lets_calls_finish(serve, channels) -> None:
    server = await serve("p", probe(), settings())
    in_flight = asyncio.create_task(call(channels, server.target, sleep=0.5))
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(server.stop(grace=3))
    await asyncio.sleep(0.05)
    assert (
        await server.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), None)
    ).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert (await in_flight)["tenant"] == context.DEFAULT_TENANT
    await stopping
    with pytest.raises(aio.AioRpcError) as raised:
        stub = tools_pb2_grpc.ToolServerServiceStub(channels.get(server.target))
        await stub.CallTool(tools_pb2.CallToolRequest(tool="x"), timeout=1)
    assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_handler_unavailable_is_not_retried_by_the_channel(serve, channels) -> None:
    servicers: list = []
    server = await serve("p", probe(servicers=servicers), settings())
    with pytest.raises(Unavailable) as raised:
        await call(channels, server.target, **{"raise": "unavailable"})
    assert raised.value.reason == "DEPENDENCY_DOWN"
    assert servicers[0].calls == 1


async def test_unreachable_target_is_retried_then_unavailable(channels) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Unavailable):
        await call(channels, f"127.0.0.1:{port}", deadline=5)


async def test_a_new_channel_does_not_inherit_a_dead_connection_to_the_same_port(
    serve, channels
) -> None:
    # Another channel in this process saw the server at this port die; a server now
    # listens there again. gRPC's process-wide subchannel pool would hand the new channel
    # that connection, still backing off: calls failed fast with UNAVAILABLE.
    first = await serve("p", probe(), settings())
    old = Channels()
    try:
        await call(old, first.target)
        await first.stop(0)
        with pytest.raises(Unavailable):
            await call(old, first.target, deadline=1)
        again = await serve("p", probe(), settings(port=first.port))
        seen = await call(channels, again.target, deadline=5)
        assert seen["remaining"] > 4.5  # answered at once, not after waiting out a back-off
    finally:
        await old.close()


async def test_a_dependency_back_after_an_outage_is_reached_within_seconds(serve, channels) -> None:
    # gRPC's own reconnect back-off grows to 120 s: after 20 s down, the next attempt
    # came 4-11 s after the server was back (30 s down: 16 s). Capped, it is seconds.
    first = await serve("p", probe(), settings())
    await call(channels, first.target)
    await first.stop(0)
    loop = asyncio.get_running_loop()
    down_until = loop.time() + 20
    while loop.time() < down_until:  # callers keep trying while it is down
        with contextlib.suppress(Unavailable, DeadlineExceeded):
            await call(channels, first.target, deadline=1)
        await asyncio.sleep(0.5)
    await serve("p", probe(), settings(port=first.port))
    back = loop.time()
    while True:
        try:
            await call(channels, first.target, deadline=1)
            break
        except (Unavailable, DeadlineExceeded):
            await asyncio.sleep(0.1)
    waited = loop.time() - back
    assert waited < MAX_RECONNECT_BACKOFF_MS * 1.2 / 1000 + 1.0, waited


async def test_message_over_the_size_limit_is_rejected(serve, channels) -> None:
    server = await serve("p", probe(), settings(max_message_bytes=1024))
    with pytest.raises(ResourceExhausted):
        await call(channels, server.target, padding="x" * 4096)
    assert (await call(channels, server.target, padding="x"))["tenant"] == "default"


def test_channels_are_cached_per_target(channels) -> None:
    assert channels.get("127.0.0.1:1") is channels.get("127.0.0.1:1")
    assert channels.get("127.0.0.1:1") is not channels.get("127.0.0.1:2")


async def test_connection_age_never_cuts_an_open_stream_and_health_watch_works(serve) -> None:
    server = await serve("p", probe(), settings(max_connection_age_seconds=0.3))
    async with aio.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        # Well past the age: the open stream is neither ended nor failed ...
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(watch.read()), timeout=1.2)
        assert not watch.done()
        # ... while new calls go over a fresh connection, transparently.
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
