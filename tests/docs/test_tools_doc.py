"""docs/tools.md stays true: every tools file it shows is the one in docs/examples/tools,
each loads (``check_tools_file``), and the builtin, command, HTTP and MCP stdio ones serve
real calls through a running gateway (explicit plans over gRPC, ``trellis tools``)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.cli import trellis
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import from_value, to_struct
from trellis_cli.stack import Stack, start_stack
from trellis_toolgateway.loader import LoadOptions, check_tools_file

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "tools.md").read_text()
EXAMPLES = ROOT / "docs" / "examples" / "tools"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED


def test_every_yaml_block_is_an_example_file_and_every_file_is_shown() -> None:
    shown = {}
    for block in BLOCKS:
        name = re.match(r"# (docs/examples/tools/[\w.-]+\.yaml):", block)
        assert name, block[:80]
        shown[name.group(1)] = block
    for path, block in shown.items():
        assert (ROOT / path).read_text() == block, f"{path} differs from docs/tools.md"
    assert set(shown) == {f"docs/examples/tools/{p.name}" for p in EXAMPLES.glob("*.yaml")}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    check_tools_file(path, LoadOptions(environ={"TRACKER_TOKEN": "t0ken"}))


async def plan_of(
    stack: Stack, channels, *calls: common_pb2.ToolCall
) -> list[common_pb2.NodeOutcome]:
    """Run ``calls`` as an explicit plan; their outcomes, in the plan's order."""
    request = executor_pb2.RunRequest()
    request.plan.extend(calls)
    client = ExecutorClient(channels.get(stack.executor_target), timeout=60)
    events = [event async for event in client.run(request)]
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED, events[-1]
    outcomes = {
        e.node_finished.outcome.node_id: e.node_finished.outcome
        for e in events
        if e.HasField("node_finished")
    }
    return [outcomes[call.node_id] for call in calls]


def node(node_id: str, tool: str, args: dict, *deps: str) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncIterator:
    """``await serving(tools_file)``: an embedded stack whose gateway serves that file."""
    stacks: list[Stack] = []

    async def start(tools_file: Path) -> Stack:
        stacks.append(
            await start_stack(
                database_url=f"sqlite:///{tmp_path}/s{len(stacks)}.db", tools_file=tools_file
            )
        )
        return stacks[-1]

    yield start
    for stack in stacks:
        await stack.stop()


async def test_builtin_and_command_examples_serve_calls(serving, channels) -> None:
    builtin = await serving(EXAMPLES / "builtin.yaml")
    read, listed = await plan_of(
        builtin,
        channels,
        node("n1", "read_file", {"path": "README.md"}),
        node("n2", "list_files", {"path": "."}),
    )
    assert "The sandbox of the tools examples" in from_value(read.output)["content"]
    assert "README.md" in str(from_value(listed.output))

    command = await serving(EXAMPLES / "command.yaml")
    counted, head = await plan_of(
        command,
        channels,
        node("n1", "text_stats", {"command": "wc README.md"}),
        node("n2", "text_stats", {"command": "head -n 1 README.md"}),
    )
    assert re.match(r"\s*\d+\s+\d+\s+\d+ ", from_value(counted.output)["stdout"])
    assert from_value(head.output)["stdout"] == "# The sandbox of the tools examples\n"


async def test_the_mcp_stdio_example_serves_its_servers_tools(
    serving, channels, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "python" in the example is the interpreter with the mcp package: this one.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    stack = await serving(EXAMPLES / "mcp-stdio.yaml")
    saved, read = await plan_of(
        stack,
        channels,
        node("save", "notes.save_note", {"title": "todo", "text": "write docs"}),
        node("read", "notes.read_note", {"title": "todo"}, "save"),
    )
    assert from_value(saved.output) == {"saved": "todo", "owner": "docs"}
    assert from_value(read.output) == {"title": "todo", "text": "write docs"}
    listed = await trellis("tools", "--target", stack.executor_target)
    assert listed.code == 0, listed
    assert re.search(r"notes\.read_note +│ title: string", listed.stdout), listed.stdout


async def test_the_http_example_calls_its_api(
    serving, channels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weather tool as declared, pointed at a local stand-in for the API."""
    seen: list[dict[str, str]] = []

    async def forecast(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        return web.json_response({"current": {"temperature_2m": 11.5, "wind_speed_10m": 3.2}})

    app = web.Application()
    app.router.add_get("/v1/forecast", forecast)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        text = (EXAMPLES / "http.yaml").read_text()
        text = text.replace("https://api.open-meteo.com", f"http://127.0.0.1:{port}")
        text = text.replace("[api.open-meteo.com]", "[127.0.0.1]")
        (tmp_path / "http.yaml").write_text(text)
        monkeypatch.setenv("TRACKER_TOKEN", "t0ken")  # create_ticket's header needs it
        stack = await serving(tmp_path / "http.yaml")
        [weather] = await plan_of(
            stack, channels, node("w", "weather", {"latitude": 48.85, "longitude": 2.35})
        )
    finally:
        await runner.cleanup()
    assert from_value(weather.output)["current"]["temperature_2m"] == 11.5
    assert seen[0]["latitude"] == "48.85" and seen[0]["current"] == "temperature_2m,wind_speed_10m"
