"""McpSource over stdio against a real MCP server process (servers/mcp_tools_server.py):
listing, contracts and policy, invocation through the Invoker, structured and text output,
the error tool, one session shared by calls from any task, a server that dies (idle, or
mid-call for safe and unsafe tools), timeouts, closing, stderr as tagged JSON log lines,
list_changed, resources, and ``${VAR}`` secrets."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tests.support.json_logs import JsonLogs
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


#: The test server's tools without annotations, and those with.
UNANNOTATED = {
    "add", "echo", "lines", "picture", "fail", "env", "pid", "slow", "traceparent", "die",
    "header", "grow",
}  # fmt: skip
ANNOTATED = {"lookup", "store", "append", "ensure", "flaky_read", "flaky_write", "shout"}


def stdio_config(**policy: object) -> McpServer:
    env = {"TRELLIS_MCP_TEST": "from-config", **policy.pop("env", {})}  # type: ignore[dict-item]
    return McpServer(
        name="testmcp",
        command=[sys.executable, str(SERVER)],
        env=env,
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
    assert set(tools) == {f"t.{n}" for n in UNANNOTATED | ANNOTATED} | {"t.read_resource"}
    add = tools["t.add"].spec
    assert add.description == "Add two integers."
    assert add.input_schema["required"] == ["a", "b"]
    assert add.input_schema["properties"]["a"]["type"] == "integer"
    # The server's outputSchema when it has one, else any JSON value.
    assert add.output_schema["type"] == "object"
    assert tools["t.echo"].spec.output_schema == PERMISSIVE_SCHEMA == {}
    # Execution policy comes from the config for every tool that says nothing of itself
    # (annotated tools: test_gateway_mcp_policy).
    unannotated = [tools[f"t.{n}"] for n in UNANNOTATED]
    assert {(t.spec.timeout, t.spec.cache_ttl, t.spec.retries) for t in unannotated} == {
        (20, 30, 2)
    }
    assert (tools["t.lookup"].spec.cache_ttl, tools["t.store"].spec.side_effects) == (30, True)
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


async def test_a_server_killed_while_idle_is_reached_again_by_the_next_call_of_any_tool(
    source: McpSource,
) -> None:
    ended = asyncio.Event()
    source.watch(ended.set)  # told when the server goes away
    tools = await tools_of(source)
    first = (await tools["t.pid"].run({}))["pid"]
    os.kill(first, signal.SIGKILL)
    await asyncio.wait_for(ended.wait(), 10)
    # Nothing was in flight: the call goes to a new session, whatever the tool (``add``
    # says nothing of being safe to repeat; it never reached the dead server).
    outcome = await invoker_for(tools).invoke(Call(tool="t.add", args={"a": 1, "b": 2}))
    assert outcome.status == SUCCEEDED, outcome.error
    assert (outcome.attempts, from_value(outcome.output)) == (1, {"sum": 3})
    assert (await tools["t.pid"].run({}))["pid"] != first


async def test_a_safe_call_lost_mid_call_is_sent_once_more_on_a_new_session(
    source: McpSource, tmp_path: Path
) -> None:
    tools = await tools_of(source)
    first = (await tools["t.pid"].run({}))["pid"]
    marker = str(tmp_path / "read-marker")
    # flaky_read is read-only: the server dies under the first call, which is then sent
    # again on a new session, so the caller sees one successful attempt.
    outcome = await invoker_for(tools).invoke(Call(tool="t.flaky_read", args={"marker": marker}))
    assert outcome.status == SUCCEEDED, outcome.error
    assert outcome.attempts == 1
    assert from_value(outcome.output)["pid"] not in (first, 0)
    assert (tmp_path / "read-marker").exists()


async def test_an_unsafe_call_lost_mid_call_is_not_sent_again(
    source: McpSource, tmp_path: Path
) -> None:
    tools = await tools_of(source)
    assert tools["t.flaky_write"].spec.side_effects  # destructive
    marker = str(tmp_path / "write-marker")
    outcome = await invoker_for(tools).invoke(
        Call(tool="t.flaky_write", args={"marker": marker}), idempotency_key="run/n1"
    )
    # It may have taken effect: the caller learns the session was lost, nothing is resent.
    assert outcome.status == FAILED
    assert (outcome.error.code, outcome.error.retryable, outcome.attempts) == (
        "MCP_UNAVAILABLE",
        True,
        1,
    )
    # The next call (a new node) reaches a new server: the marker is there, so it answers.
    assert "pid" in await tools["t.flaky_write"].run({"marker": marker})


async def test_stderr_lines_are_json_log_events_tagged_with_the_server() -> None:
    logs = JsonLogs(level="info")
    mcp = McpSource(stdio_config())
    try:
        tools = await tools_of(mcp)
        await tools["t.shout"].run({"text": "something went wrong {oops}"})
        await mcp.aclose()  # the pipe is drained when the server stops
    finally:
        logs.restore()
        await mcp.aclose()
    stderr = [e for e in logs.events() if e["event"] == "MCP server stderr"]
    last = {"server": "testmcp", "line": "something went wrong {oops}"}
    assert last.items() <= stderr[-1].items()
    assert stderr[0]["line"].startswith("trellis-test-tools starting")
    assert all(e["level"] == "info" and e["server"] == "testmcp" for e in stderr)
    # Nothing the server wrote reached the gateway's stderr unwrapped.
    assert not any(not line.startswith("{") for line in logs.lines())


async def test_list_changed_tells_the_watcher_and_the_new_tool_is_listed(
    source: McpSource,
) -> None:
    changed = asyncio.Event()
    source.watch(changed.set)
    tools = await tools_of(source)
    assert "t.fresh" not in tools
    assert await tools["t.grow"].run({"name": "fresh"}) == {"added": "fresh"}
    await asyncio.wait_for(changed.wait(), 10)
    tools = await tools_of(source)
    assert await tools["t.fresh"].run({"text": "hi"}) == {"result": "fresh: hi"}


async def test_resources_are_read_through_a_read_resource_tool(source: McpSource) -> None:
    tools = await tools_of(source)
    reader = tools["t.read_resource"]
    assert "- trellis://readme: readme - What this server is." in reader.spec.description
    assert "- trellis://notes/{topic}: note - A note on a topic." in reader.spec.description
    assert not reader.spec.side_effects and reader.spec.input_schema["required"] == ["uri"]
    invoker = invoker_for(tools)
    outcome = await invoker.invoke(Call(tool="t.read_resource", args={"uri": "trellis://readme"}))
    assert from_value(outcome.output) == "A small MCP server for the gateway's tests."
    note = await reader.run({"uri": "trellis://notes/cats"})
    assert note == "Notes on cats."
    missing = await invoker.invoke(Call(tool="t.read_resource", args={"uri": "trellis://none"}))
    assert (missing.status, missing.error.code) == (FAILED, "MCP_RESOURCE_ERROR")


@pytest.mark.parametrize("entry", [{"resources": False}, {"exclude": ["read_*"]}])
async def test_resources_can_be_left_out(entry: dict) -> None:
    mcp = McpSource(stdio_config(**entry))
    try:
        assert "t.read_resource" not in await tools_of(mcp)
    finally:
        await mcp.aclose()


async def test_env_secrets_reach_the_server_and_are_kept_out_of_outputs_and_logs() -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    logs = JsonLogs(level="info")
    config = stdio_config(env={"TRELLIS_MCP_TEST_SECRET": "${TRELLIS_TEST_TOKEN}"})
    mcp = McpSource(config, environ={"TRELLIS_TEST_TOKEN": secret})
    try:
        tools = await tools_of(mcp)
        # The server has it (its output is scrubbed, so compare what it does with it) ...
        value = await tools["t.env"].run({"name": "TRELLIS_MCP_TEST_SECRET"})
        assert value == {"value": "[redacted]"}
        outcome = await invoker_for(tools).invoke(
            Call(tool="t.fail", args={"reason": f"bad key {secret}"})
        )
        assert outcome.status == FAILED and secret not in str(outcome.error)
        assert "bad key [redacted]" in outcome.error.message
        await mcp.aclose()
    finally:
        logs.restore()
        await mcp.aclose()
    # ... and it printed it to stderr at start, which the logs hold redacted.
    text = "\n".join(logs.lines())
    assert secret not in text
    assert "trellis-test-tools starting; secret=[redacted]" in text
    assert config.env["TRELLIS_MCP_TEST_SECRET"] == "${TRELLIS_TEST_TOKEN}"  # the file's text
