"""Output size caps, for every kind of tool, through the real gateway service over gRPC:
TRELLIS_TOOL_MAX_RESULT_BYTES and a tool's own ``max_result_bytes`` fail a call with
OUTPUT_TOO_LARGE (not retryable, nothing cached), a 10 MB answer from an HTTP tool or a
gRPC tool server is refused without being held in memory, and the gateway keeps serving."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from grpc import aio

from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_value, to_struct, to_value
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis.tools.v1 import tools_pb2, tools_pb2_grpc
from trellis_cache.service import NAME as CACHE_NAME
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
TEN_MB = 10 * 1024 * 1024
CHUNK = 64 * 1024
#: The gateway's default cap in these tests (TRELLIS_TOOL_MAX_RESULT_BYTES).
DEFAULT_CAP = 4096


@pytest.fixture
async def big_http(http_app) -> int:
    """An HTTP server whose /big answers 10 MB, written 64 KiB at a time (never held whole)."""

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        chunk = b"x" * CHUNK
        try:
            for _ in range(TEN_MB // CHUNK):
                await response.write(chunk)
        except (ConnectionResetError, RuntimeError):  # the gateway hung up: expected
            pass
        return response

    app = web.Application()
    app.router.add_get("/big", big)
    return await http_app(app)


class BlobServer(tools_pb2_grpc.ToolServerServiceServicer):
    """A tool server whose ``blob`` tool answers ``args.bytes`` bytes of text."""

    async def ListTools(self, request, context):  # type: ignore[no-untyped-def]
        spec = common_pb2.ToolSpec(name="blob", description="A blob of the given size.")
        return tools_pb2.ListToolsResponse(tools=[spec])

    async def CallTool(self, request, context):  # type: ignore[no-untyped-def]
        size = int(request.args["bytes"])
        return tools_pb2.CallToolResponse(output=to_value("y" * size))


@pytest.fixture
async def blob_server() -> AsyncIterator[str]:
    server = aio.server()  # sends messages of any size; the gateway's channel decides
    tools_pb2_grpc.add_ToolServerServiceServicer_to_server(BlobServer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
async def gateway(serve, channels, tmp_path: Path, big_http: int, blob_server: str):
    tools_file = tmp_path / "tools.yaml"
    tools_file.write_text(
        f"""
version: 1
sandbox_root: .
tools:
  - name: echo
    builtin: echo
  - name: small_echo
    builtin: echo
    max_result_bytes: 1000
  - name: cached_echo
    builtin: echo
    cache_ttl: 60
    max_result_bytes: 1000
  - name: big_http
    kind: http
    url: http://127.0.0.1:{big_http}/big
    allowed_hosts: ["127.0.0.1"]
    max_response_bytes: 67108864
    max_result_bytes: 1048576
grpc_tool_servers:
  - name: remote
    target: {blob_server}
    max_result_bytes: 104857600
"""
    )
    cache = await serve(CACHE_NAME, build_cache, CacheSettings(port=0, metrics_port=0))
    settings = GatewaySettings(
        port=0,
        metrics_port=0,
        tools_file=tools_file,
        tools_reload_seconds=0,
        tool_max_result_bytes=DEFAULT_CAP,
        cache_target=cache.target,
    )
    server = await serve(NAME, build, settings)
    return ToolGatewayClient(channels.get(server.target), timeout=30)


def call(tool: str, **args: object) -> toolgateway_pb2.InvokeToolRequest:
    return toolgateway_pb2.InvokeToolRequest(
        call=common_pb2.ToolCall(node_id="n1", tool=tool, args=to_struct(args))
    )


def assert_too_large(outcome: common_pb2.NodeOutcome, limit: int) -> None:
    assert outcome.status == FAILED, outcome
    assert outcome.error.code == "OUTPUT_TOO_LARGE"
    assert outcome.error.retryable is False
    assert outcome.error.details["limit_bytes"] == str(limit)
    assert f"{limit} bytes" in outcome.error.message
    assert not outcome.HasField("output")


async def still_serves(gateway: ToolGatewayClient) -> None:
    outcome = await gateway.invoke(call("echo", value="still here"))
    assert outcome.status == SUCCEEDED and from_value(outcome.output) == "still here"


async def test_the_gateway_default_caps_a_builtin(gateway: ToolGatewayClient) -> None:
    assert_too_large(await gateway.invoke(call("echo", value="z" * 10_000)), DEFAULT_CAP)
    fits = await gateway.invoke(call("echo", value="z" * 3000))
    assert fits.status == SUCCEEDED
    await still_serves(gateway)


async def test_a_tools_own_cap_overrides_the_default(gateway: ToolGatewayClient) -> None:
    assert_too_large(await gateway.invoke(call("small_echo", value="z" * 2000)), 1000)
    assert (await gateway.invoke(call("small_echo", value="z" * 500))).status == SUCCEEDED


async def test_an_output_over_its_cap_is_never_cached(gateway: ToolGatewayClient) -> None:
    for _ in range(2):  # the second call runs the tool again: nothing was stored
        outcome = await gateway.invoke(call("cached_echo", value="z" * 2000))
        assert_too_large(outcome, 1000)
        assert outcome.attempts == 1 and not outcome.cache_hit


async def test_ten_megabytes_from_an_http_tool_are_refused_unbuffered(
    gateway: ToolGatewayClient,
) -> None:
    tracemalloc.start()
    try:
        outcome = await gateway.invoke(call("big_http"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_too_large(outcome, 1024 * 1024)
    # The body was read up to the cap and dropped: nowhere near 10 MB was ever held.
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"
    await still_serves(gateway)


async def test_ten_megabytes_from_a_grpc_tool_server_are_refused(
    gateway: ToolGatewayClient,
) -> None:
    outcome = await gateway.invoke(call("blob", bytes=TEN_MB))
    assert outcome.status == FAILED
    assert outcome.error.code == "OUTPUT_TOO_LARGE" and outcome.error.retryable is False
    assert "larger than max" in outcome.error.message
    # Within the channel's message size, the tool's own cap (the source's) applies.
    fits = await gateway.invoke(call("blob", bytes=100_000))
    assert fits.status == SUCCEEDED and len(from_value(fits.output)) == 100_000
    await still_serves(gateway)
