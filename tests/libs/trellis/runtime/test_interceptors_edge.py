"""Input at the edge of every server (the rules interceptor), over real gRPC: requests
that do not decode are INVALID_ARGUMENT ``MALFORMED_REQUEST`` for every method of every
service (unary, server-streaming, bidirectional), never gRPC's UNKNOWN, and the handler
never sees them; an ``x-tenant-id`` that is not a tenant id is INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.libs.trellis.runtime.test_server import SERVICE, call, probe, settings
from tests.malformed import CORRUPT, TRUNCATED, deep_struct, field, invalid_utf8
from trellis.runtime import context
from trellis.runtime.errors import InvalidArgument, from_rpc_error

BAD_CALL_TOOL = {
    "corrupt": CORRUPT,
    "truncated": TRUNCATED,
    "invalid utf-8 in tool": invalid_utf8(1),
    "args nested past the depth limit": field(1, b"x") + field(2, deep_struct(60)),
}


def _raw(channel: aio.Channel, method: str, kind: str = "unary_unary"):  # type: ignore[no-untyped-def]
    """A method of ``channel`` that sends bytes as they are (no serializer)."""
    return getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)


def _refused(error: grpc.RpcError) -> InvalidArgument:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    refused = from_rpc_error(error)
    assert isinstance(refused, InvalidArgument)
    return refused


@pytest.mark.parametrize("name", list(BAD_CALL_TOOL))
async def test_undecodable_unary_request_is_malformed_request(serve, name: str) -> None:
    servicers: list = []
    server = await serve("p", probe(servicers=servicers), settings())
    async with aio.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            await _raw(channel, f"/{SERVICE}/CallTool")(BAD_CALL_TOOL[name], timeout=5)
    refused = _refused(raised.value)
    assert refused.reason == "MALFORMED_REQUEST"
    assert refused.metadata == {"method": f"/{SERVICE}/CallTool"}
    assert servicers[0].calls == 0  # the handler never saw it


async def test_streaming_and_runtime_services_refuse_bad_bytes_too(serve, channels) -> None:
    """Health (unary and server-streaming Watch) and reflection (bidirectional) are
    wrapped like the service's own methods; the server answers normally afterwards."""
    server = await serve("p", probe(), settings())
    async with aio.insecure_channel(server.target) as channel:
        calls = [
            _raw(channel, "/grpc.health.v1.Health/Check")(CORRUPT, timeout=5),
            _raw(channel, "/grpc.health.v1.Health/Watch", "unary_stream")(CORRUPT, timeout=5),
            _raw(
                channel,
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "stream_stream",
            )(iter([CORRUPT]), timeout=5),
        ]
        for pending in calls:
            with pytest.raises(grpc.RpcError) as raised:
                if hasattr(pending, "__aiter__"):
                    async for _ in pending:
                        pass
                else:
                    await pending
            assert _refused(raised.value).reason == "MALFORMED_REQUEST"
    health = health_pb2_grpc.HealthStub(channels.get(server.target))
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert (await call(channels, server.target))["tenant"] == context.DEFAULT_TENANT


@pytest.mark.parametrize("tenant", ["../acme", "a b", "-x", "t" * 65])
async def test_an_x_tenant_id_that_is_not_a_tenant_id_is_refused(
    serve, channels, tenant: str
) -> None:
    servicers: list = []
    server = await serve("p", probe(servicers=servicers), settings())
    with context.request_scope(tenant_id=tenant), pytest.raises(InvalidArgument) as raised:
        await call(channels, server.target)
    assert raised.value.reason == "INVALID_ID"
    assert [v.field for v in raised.value.violations] == [context.TENANT_METADATA_KEY]
    assert servicers[0].calls == 0
    with context.request_scope(tenant_id="acme.eu-1"):
        assert (await call(channels, server.target))["tenant"] == "acme.eu-1"
