"""McpSource over stdio against a real MCP server process (servers/mcp_tools_server.py):
listing, contracts and policy, invocation through the Invoker, structured and text output,
the error tool, one session shared by calls from any task, a server that dies, timeouts,
and closing."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_value
from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import Tool, ToolError
from trellis_toolgateway.tools.config import McpServer
from trellis_toolgateway.tools.mcp_source import PERMISSIVE_SCHEMA, McpSource, output_of

SERVER = Path(__file__).parent / "servers" / "mcp_tools_server.py"
SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED


def stdio_config(**policy: object) -> McpServer:
    return McpServer(
        name="testmcp",
        command=[sys.executable, str(SERVER)],
        env={"TRELLIS_MCP_TEST": "from-config"},
        prefix="t.",
        **policy,  # type: ignore[arg-type]
    )


@pytest.fixture
async def source() -> AsyncIterator[McpSource]:
    # retries=0: each call below is exactly one attempt, whatever the invoker's retry policy.
    mcp = McpSource(stdio_config(timeout=20))
    yield mcp
    await mcp.aclose()


async def tools_of(source: McpSource) -> dict[str, Tool]:
    return {t.spec.name: t for t in await source.tools()}


def invoker_for(tools: dict[str, Tool]) -> Invoker:
    return Invoker(ToolRegistry(list(tools.values())), None, trace.get_tracer(__name__))


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is gone if its state says so.
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] == "Z"


async def test_lists_the_servers_tools_with_their_contract_and_the_config_policy() -> None:
    source = McpSource(stdio_config(timeout=20, cache_ttl=30, retries=2, cost_nano_usd=7))
    try:
        tools = await tools_of(source)
    finally:
        await source.aclose()
    assert set(tools) == {
        f"t.{n}"
        for n in ("add", "echo", "lines", "picture", "fail", "env", "pid", "slow", "traceparent")
    } | {"t.die"}
    add = tools["t.add"].spec
    assert add.description == "Add two integers."
    assert add.input_schema["required"] == ["a", "b"]
    assert add.input_schema["properties"]["a"]["type"] == "integer"
    # The server's outputSchema when it has one, else any JSON value.
    assert add.output_schema["type"] == "object"
    assert tools["t.echo"].spec.output_schema == PERMISSIVE_SCHEMA == {}
    # Execution policy comes from the config, for every tool of the source.
    assert {(t.spec.timeout, t.spec.cache_ttl, t.spec.retries) for t in tools.values()} == {
        (20, 30, 2)
    }
    assert add.cost_nano_usd == 7 and add.version == "1" and not add.side_effects
    assert tools["t.add"].remote_name == "add"  # type: ignore[attr-defined]


async def test_invokes_tools_through_the_invoker(source: McpSource) -> None:
    invoker = invoker_for(await tools_of(source))

    async def output(tool: str, args: dict) -> object:
        outcome = await invoker.invoke(Call(tool=tool, args=args, node_id="n1"))
        assert outcome.status == SUCCEEDED, outcome.error
        return from_value(outcome.output)

    assert await output("t.add", {"a": 2, "b": 40}) == {"sum": 42}  # structuredContent
    assert await output("t.echo", {"text": "hi there"}) == "hi there"  # text content
    assert await output("t.lines", {"first": "a", "second": "b"}) == "a\nb"  # text joined
    assert await output("t.picture", {"caption": "cat"}) == [  # non-text: items as JSON
        {"type": "text", "text": "cat"},
        {"type": "image", "data": "iVBORw==", "mimeType": "image/png"},
    ]


async def test_input_is_validated_before_the_server_is_called(source: McpSource) -> None:
    invoker = invoker_for(await tools_of(source))
    with pytest.raises(InvalidArgument) as raised:
        await invoker.invoke(Call(tool="t.add", args={"a": "two", "b": 1}))
    assert raised.value.reason == "ARGS_INVALID"
    assert [v.field for v in raised.value.violations] == ["args.a"]


async def test_an_error_result_is_a_failed_outcome_with_mcp_tool_error(source: McpSource) -> None:
    tools = await tools_of(source)
    outcome = await invoker_for(tools).invoke(Call(tool="t.fail", args={"reason": "boom"}))
    assert outcome.status == FAILED
    assert outcome.error.code == "MCP_TOOL_ERROR"
    assert "failed on purpose: boom" in outcome.error.message
    assert not outcome.error.retryable
    with pytest.raises(ToolError) as raised:
        await tools["t.fail"].run({"reason": "again"})
    assert raised.value.details == {"server": "testmcp", "tool": "fail"}


async def test_env_is_merged_over_a_minimal_environment(
    source: McpSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server starts lazily, after this is set: a gateway secret must not reach it.
    monkeypatch.setenv("TRELLIS_GATEWAY_SECRET", "do-not-leak")
    tools = await tools_of(source)

    async def env(name: str) -> str:
        return (await tools["t.env"].run({"name": name}))["value"]

    assert await env("TRELLIS_MCP_TEST") == "from-config"
    assert await env("TRELLIS_GATEWAY_SECRET") == ""
    assert await env("PATH") == os.environ["PATH"]


async def test_one_session_serves_concurrent_calls_from_any_task(source: McpSource) -> None:
    # Opened by a task that then ends: the session must outlive it.
    tools = await asyncio.create_task(tools_of(source))
    pids = await asyncio.gather(
        *(asyncio.create_task(tools["t.pid"].run({})) for _ in range(8)),
        asyncio.create_task(tools["t.pid"].run({})),
    )
    assert len({p["pid"] for p in pids}) == 1
    sums = await asyncio.gather(*(tools["t.add"].run({"a": i, "b": i}) for i in range(20)))
    assert [s["sum"] for s in sums] == [2 * i for i in range(20)]
    assert (await tools["t.pid"].run({}))["pid"] == pids[0]["pid"]


async def test_each_call_carries_its_callers_trace_context(source: McpSource) -> None:
    tracer = TracerProvider().get_tracer(__name__)

    def trace_id(span: trace.Span) -> str:
        return format(span.get_span_context().trace_id, "032x")

    # The session is opened inside one span; it must not stick to the session.
    with tracer.start_as_current_span("load") as load:
        tools = await tools_of(source)
    with tracer.start_as_current_span("call") as call:
        parent = (await tools["t.traceparent"].run({}))["traceparent"]
    # Same trace as the caller's span (the SDK's own client span, if a global tracer
    # provider records one, sits between them).
    assert parent.split("-")[1] == trace_id(call) != trace_id(load)
    # Outside any span: no caller trace (empty, or the SDK's own new trace if it records).
    outside = (await tools["t.traceparent"].run({}))["traceparent"]
    assert outside == "" or outside.split("-")[1] not in {trace_id(call), trace_id(load)}


async def test_a_server_that_dies_is_unavailable_then_the_session_is_reestablished(
    source: McpSource,
) -> None:
    tools = await tools_of(source)
    first = (await tools["t.pid"].run({}))["pid"]

    outcome = await invoker_for(tools).invoke(Call(tool="t.die", args={}))
    assert outcome.attempts == 1
    assert outcome.status == FAILED
    assert outcome.error.code == "MCP_UNAVAILABLE"
    assert outcome.error.retryable

    second = (await tools["t.pid"].run({}))["pid"]
    assert second != first  # a new server process, a new session
    assert (await tools["t.add"].run({"a": 1, "b": 1})) == {"sum": 2}
    for _ in range(100):
        if process_gone(first):
            break
        await asyncio.sleep(0.05)
    assert process_gone(first)


async def test_a_slow_call_times_out_and_the_session_stays_usable() -> None:
    mcp = McpSource(stdio_config(timeout=0.5))
    try:
        tools = await tools_of(mcp)
        pid = (await tools["t.pid"].run({}))["pid"]
        outcome = await invoker_for(tools).invoke(Call(tool="t.slow", args={"seconds": 5}))
        assert outcome.status == FAILED
        assert outcome.error.code == "TOOL_TIMEOUT"
        # The abandoned call was cancelled, not the session.
        assert (await tools["t.pid"].run({}))["pid"] == pid
        assert (await tools["t.slow"].run({"seconds": 0.01})) == {"slept": 0.01}
    finally:
        await mcp.aclose()


async def test_aclose_stops_the_server_and_later_calls_are_unavailable() -> None:
    mcp = McpSource(stdio_config())
    tools = await tools_of(mcp)
    pid = (await tools["t.pid"].run({}))["pid"]
    await mcp.aclose()
    assert process_gone(pid)
    with pytest.raises(ToolError) as raised:
        await tools["t.pid"].run({})
    assert raised.value.code == "MCP_UNAVAILABLE"
    await mcp.aclose()  # idempotent


async def test_a_command_that_cannot_start_is_unavailable(tmp_path: Path) -> None:
    mcp = McpSource(McpServer(name="missing", command=[str(tmp_path / "no-such-server")]))
    try:
        with pytest.raises(ToolError) as raised:
            await mcp.tools()
        assert raised.value.code == "MCP_UNAVAILABLE"
        assert raised.value.retryable
        assert "missing" in raised.value.message
    finally:
        await mcp.aclose()


async def test_a_server_that_never_answers_initialize_times_out() -> None:
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    mcp = McpSource(McpServer(name="silent", command=silent), connect_timeout=0.5)
    try:
        with pytest.raises(ToolError) as raised:
            await mcp.tools()
        assert raised.value.code == "MCP_UNAVAILABLE"
        assert "no session within 0.5s" in raised.value.message
    finally:
        await mcp.aclose()


def test_output_of_prefers_structured_content() -> None:
    from mcp import types

    text = types.TextContent(type="text", text="ignored")
    structured = types.CallToolResult(content=[text], structured_content={"x": 1})
    assert output_of(structured) == {"x": 1}
    assert output_of(types.CallToolResult(content=[])) == ""


def test_a_config_without_a_command_is_refused() -> None:
    config = McpServer.model_construct(name="empty", command=[], url=None)
    with pytest.raises(ValueError, match="command is empty"):
        McpSource(config)
