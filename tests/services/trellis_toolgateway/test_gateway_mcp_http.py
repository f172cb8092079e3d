"""McpSource over HTTP against a real MCP server process on 127.0.0.1
(servers/mcp_tools_server.py --http / --sse): listing, invocation, the error tool, a server
that goes away (MCP_UNAVAILABLE, then recovery once it is back), a server that restarted
while the session was idle (it forgot the session: a new one is opened transparently),
``headers`` with ``${VAR}`` secrets, and the legacy HTTP+SSE transport."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_value
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import Tool, ToolError
from trellis_toolgateway.tools.config import McpServer
from trellis_toolgateway.tools.mcp_source import McpSource

SERVER = Path(__file__).parent / "servers" / "mcp_tools_server.py"
SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED


@dataclass
class HttpServer:
    process: asyncio.subprocess.Process
    port: int

    sse: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{'sse' if self.sse else 'mcp'}"

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


async def start_server(port: int = 0, *, sse: bool = False) -> HttpServer:
    """Start the server (port 0: a free one) and wait until it listens."""
    transport = "--sse" if sse else "--http"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER), transport, "--port", str(port), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert line.startswith("listening "), f"MCP HTTP server did not start: {line!r}"
    return HttpServer(process, int(line.split()[1]), sse)


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    running = await start_server()
    yield running
    await running.stop()


@pytest.fixture
async def source(server: HttpServer) -> AsyncIterator[McpSource]:
    mcp = McpSource(McpServer(name="httpmcp", url=server.url, prefix="h.", timeout=20))
    yield mcp
    await mcp.aclose()


async def tools_of(source: McpSource) -> dict[str, Tool]:
    return {t.spec.name: t for t in await source.tools()}


async def test_lists_and_invokes_over_streamable_http(source: McpSource) -> None:
    tools = await tools_of(source)
    assert {"h.add", "h.echo", "h.fail", "h.pid"} <= set(tools)
    assert tools["h.add"].spec.input_schema["required"] == ["a", "b"]

    invoker = Invoker(ToolRegistry(list(tools.values())), None, trace.get_tracer(__name__))
    outcome = await invoker.invoke(Call(tool="h.add", args={"a": 20, "b": 22}))
    assert outcome.status == SUCCEEDED
    assert from_value(outcome.output) == {"sum": 42}
    assert await tools["h.echo"].run({"text": "over http"}) == "over http"

    failed = await invoker.invoke(Call(tool="h.fail", args={"reason": "http"}))
    assert failed.status == FAILED
    assert failed.error.code == "MCP_TOOL_ERROR"
    assert "failed on purpose: http" in failed.error.message


async def test_a_server_that_goes_away_is_unavailable_until_it_is_back(
    server: HttpServer, source: McpSource
) -> None:
    tools = await tools_of(source)
    first = (await tools["h.pid"].run({}))["pid"]

    await server.stop()
    for attempt in range(2):  # the call on the lost session, then a failed reconnect
        with pytest.raises(ToolError) as raised:
            await tools["h.pid"].run({})
        assert raised.value.code == "MCP_UNAVAILABLE", attempt
        assert raised.value.retryable

    restarted = await start_server(server.port)
    try:
        second = (await tools["h.pid"].run({}))["pid"]
        assert second == restarted.process.pid != first
        assert await tools["h.add"].run({"a": 1, "b": 2}) == {"sum": 3}
    finally:
        await restarted.stop()


async def test_a_server_restarted_while_idle_gets_a_new_session_transparently(
    server: HttpServer, source: McpSource
) -> None:
    tools = await tools_of(source)
    assert (await tools["h.pid"].run({}))["pid"] == server.process.pid

    await server.stop()
    restarted = await start_server(server.port)
    try:
        # The new process does not know our session id and refuses the request before
        # running anything, so McpSource opens a new session and sends it again.
        assert (await tools["h.pid"].run({}))["pid"] == restarted.process.pid
    finally:
        await restarted.stop()


async def test_an_unreachable_url_is_unavailable() -> None:
    stopped = await start_server()
    await stopped.stop()  # a port that was just free: nothing listens there now
    mcp = McpSource(McpServer(name="nobody", url=stopped.url), connect_timeout=10)
    try:
        with pytest.raises(ToolError) as raised:
            await mcp.tools()
        assert raised.value.code == "MCP_UNAVAILABLE"
        assert "ConnectError" in raised.value.message
    finally:
        await mcp.aclose()


def secret_headers(token: str) -> tuple[dict[str, str], dict[str, str]]:
    """The entry's headers and the environment they read ``token`` from."""
    headers = {"Authorization": "Bearer ${TRELLIS_TEST_MCP_TOKEN}", "X-Trellis-Test": "plain"}
    return headers, {"TRELLIS_TEST_MCP_TOKEN": token}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("sse", [False, True], ids=["streamable_http", "sse"])
async def test_headers_with_secrets_reach_the_server(sse: bool) -> None:
    running = await start_server(sse=sse)
    token = f"tok-{uuid.uuid4().hex}"
    headers, environ = secret_headers(token)
    transport = "sse" if sse else "streamable_http"
    config = McpServer(name="authed", url=running.url, transport=transport, headers=headers)
    mcp = McpSource(config, environ=environ)
    try:
        tools = await tools_of(mcp)
        auth = await tools["header"].run({"name": "Authorization"})
        # The server got the token (same digest); the output shows it scrubbed.
        assert auth == {"value": "Bearer [redacted]", "sha256": digest(f"Bearer {token}")}
        plain = await tools["header"].run({"name": "X-Trellis-Test"})
        assert plain["value"] == "plain"
        assert await tools["add"].run({"a": 20, "b": 22}) == {"sum": 42}
    finally:
        await mcp.aclose()
        await running.stop()
    assert config.headers["Authorization"] == "Bearer ${TRELLIS_TEST_MCP_TOKEN}"


async def test_sse_server_that_goes_away_is_unavailable_until_it_is_back() -> None:
    running = await start_server(sse=True)
    mcp = McpSource(McpServer(name="sse", url=running.url, transport="sse"))
    try:
        tools = await tools_of(mcp)
        first = (await tools["pid"].run({}))["pid"]
        await running.stop()
        with pytest.raises(ToolError) as raised:
            await tools["pid"].run({})
        assert raised.value.code == "MCP_UNAVAILABLE"
        running = await start_server(running.port, sse=True)
        assert (await tools["pid"].run({}))["pid"] == running.process.pid != first
    finally:
        await mcp.aclose()
        await running.stop()
