"""MCP servers behind the whole gateway over real gRPC (beside a real cache service): real
servers from the registries (PyPI ``mcp-server-git``, npm ``server-filesystem`` and
``server-everything``) beside the in-repo test server, with the policy their annotations
give, the catalog kept current (a slow server joining without a reload, list_changed),
include/exclude, name collisions and source states in ListTools and the metrics."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from tests.support.json_logs import JsonLogs
from tests.support.mcp_servers import everything_server, filesystem_server, git_server, tools_server
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value, seconds, to_struct
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cache.service import NAME as CACHE_NAME
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
UP = toolgateway_pb2.TOOL_SOURCE_STATE_UP
CONNECTING = toolgateway_pb2.TOOL_SOURCE_STATE_CONNECTING

StartGateway = Callable[..., Awaitable[ToolGatewayClient]]


@pytest.fixture
async def start_gateway(serve, channels, tmp_path: Path) -> StartGateway:
    """``await start_gateway({tools file as a dict}, **settings)``: a gateway over gRPC."""
    cache = await serve(CACHE_NAME, build_cache, CacheSettings(port=0, metrics_port=0))

    async def start(tools: dict, **settings: object) -> ToolGatewayClient:
        path = tmp_path / "tools.yaml"
        path.write_text(yaml.safe_dump({"version": 1, **tools}))
        gateway_settings = GatewaySettings(
            port=0,
            metrics_port=0,
            cache_target=cache.target,
            tools_file=path,
            tools_reload_seconds=0,  # nothing below is a reload
            **settings,
        )
        server = await serve(NAME, build, gateway_settings)
        return ToolGatewayClient(channels.get(server.target), timeout=60)

    return start


def call(tool: str, node: str = "n1", run: str = "run-1", **args: object):
    return toolgateway_pb2.InvokeToolRequest(
        call=common_pb2.ToolCall(node_id=node, tool=tool, args=to_struct(args)),
        run_id=run,
        idempotency_key=f"{run}/{node}",
    )


async def output(gateway: ToolGatewayClient, tool: str, **args: object) -> object:
    outcome = await gateway.invoke(call(tool, **args))
    assert outcome.status == SUCCEEDED, outcome.error
    return from_value(outcome.output)


def gauge(name: str, source: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"source": source})


async def until(predicate: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Poll ``predicate`` (a gRPC question to the gateway) until it holds."""
    async with asyncio.timeout(within):
        for _ in itertools.count():
            if await predicate():
                return
            await asyncio.sleep(0.1)


def git_repository(root: Path) -> Path:
    root.mkdir()
    for argv in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "Test"],
    ):
        subprocess.run(argv, cwd=root, check=True)
    (root / "README").write_text("hello\n")
    subprocess.run(["git", "add", "README"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "first"], cwd=root, check=True)
    return root


def commits(root: Path) -> int:
    count = subprocess.run(
        ["git", "rev-list", "--count", "HEAD"], cwd=root, check=True, capture_output=True
    )
    return int(count.stdout)


async def test_real_servers_annotations_set_policy_caching_and_run_once(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    repo = git_repository(tmp_path / "repo")
    files = tmp_path / "files"
    files.mkdir()
    gateway = await start_gateway(
        {
            "mcp_servers": [
                {
                    "name": "git",
                    "command": git_server(repo),
                    "prefix": "git.",
                    "cache_ttl": 60,
                    "retries": 2,
                },
                {
                    "name": "fs",
                    "command": filesystem_server(files),
                    "prefix": "fs.",
                    "cache_ttl": 60,
                    "retries": 2,
                },
            ]
        }
    )
    tools = {t.name: t for t in await gateway.list_tools()}
    policy = {
        name: (tools[name].side_effects, seconds(tools[name].cache_ttl))
        for name in (
            "git.git_status",  # readOnlyHint
            "git.git_commit",  # not destructive, not idempotent
            "git.git_reset",  # destructive, idempotent
            "git.git_add",  # not destructive, idempotent
            "fs.read_text_file",  # readOnlyHint
            "fs.write_file",  # destructive
            "fs.create_directory",  # not destructive, idempotent
        )
    }
    assert policy == {
        "git.git_status": (False, 60),
        "git.git_commit": (True, 0),
        "git.git_reset": (True, 0),
        "git.git_add": (False, 0),
        "fs.read_text_file": (False, 60),
        "fs.write_file": (True, 0),
        "fs.create_directory": (False, 0),
    }

    # A read-only tool is served from the cache the second time.
    first = await gateway.invoke(call("git.git_status", repo_path=str(repo)))
    again = await gateway.invoke(call("git.git_status", node="n2", repo_path=str(repo)))
    assert first.status == again.status == SUCCEEDED
    assert (first.cache_hit, again.cache_hit, again.attempts) == (False, True, 0)

    # A side-effecting one runs once per idempotency key: the retry of a node replays it.
    (repo / "new.txt").write_text("new\n")
    await output(gateway, "git.git_add", repo_path=str(repo), files=["new.txt"])
    commit = call("git.git_commit", node="c1", repo_path=str(repo), message="add new.txt")
    done, replayed = await gateway.invoke(commit), await gateway.invoke(commit)
    assert done.status == SUCCEEDED and done.attempts == 1, done.error
    assert replayed.output == done.output and replayed.attempts == 1  # the first's outcome
    assert commits(repo) == 2  # one commit, not two

    # The filesystem server's destructive write, then a read through it.
    text = str(files / "note.txt")
    await output(gateway, "fs.write_file", path=text, content="written by a plan")
    assert (files / "note.txt").read_text() == "written by a plan"
    read = await output(gateway, "fs.read_text_file", path=text)
    assert read == {"content": "written by a plan"}  # its structuredContent


async def test_include_and_exclude_on_a_real_server(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = await start_gateway(
        {
            "mcp_servers": [
                {
                    "name": "fs",
                    "command": filesystem_server(tmp_path),
                    "include": ["read_*", "list_directory"],
                    "exclude": ["read_media_file", "read_file"],  # read_file: deprecated
                }
            ]
        }
    )
    assert sorted(t.name for t in await gateway.list_tools()) == [
        "list_directory",
        "read_multiple_files",
        "read_text_file",
    ]


async def test_everything_server_resources_and_its_list_changed(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(
        {"mcp_servers": [{"name": "everything", "command": everything_server(), "prefix": "ev."}]}
    )
    tools = {t.name: t for t in await gateway.list_tools()}
    # It registers more tools right after initialize and says so (tools/list_changed):
    # the catalog follows without a reload.
    await until(lambda: _has(gateway, "ev.simulate-research-query"))
    assert await output(gateway, "ev.get-sum", a=2, b=40) in ("The sum of 2 and 40 is 42.", 42)
    # Its resources, through one read-only tool that lists them.
    reader = tools["ev.read_resource"]
    assert "demo://resource/static/document/architecture.md" in reader.description
    assert not reader.side_effects
    text = await output(
        gateway, "ev.read_resource", uri="demo://resource/static/document/architecture.md"
    )
    assert isinstance(text, str) and "Architecture" in text
    unknown = await gateway.invoke(call("ev.read_resource", uri="demo://nothing/here"))
    assert unknown.status == FAILED and unknown.error.code == "MCP_RESOURCE_ERROR"


async def _has(gateway: ToolGatewayClient, name: str) -> bool:
    return name in {t.name for t in await gateway.list_tools()}


async def test_a_slow_starting_server_joins_the_catalog_without_a_reload(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(
        {
            "tools": [{"name": "echo", "builtin": "echo"}],
            "mcp_servers": [
                {"name": "slow", "command": tools_server("--start-delay", "3"), "prefix": "s."}
            ],
        },
        tool_source_list_seconds=0.3,  # the gateway does not wait for it
    )
    catalog = await gateway.catalog()
    assert [t.name for t in catalog.tools] == ["echo"]
    [source] = catalog.sources
    assert (source.name, source.kind, source.state, source.tools) == ("slow", "mcp", CONNECTING, 0)
    assert gauge("trellis_tool_source_up", "slow") == 0
    before = catalog.catalog_version

    await until(lambda: _has(gateway, "s.add"))
    catalog = await gateway.catalog()
    [source] = catalog.sources
    assert (source.state, source.error) == (UP, "")
    assert source.tools == len(catalog.tools) - 1  # all but echo
    assert catalog.catalog_version != before
    assert gauge("trellis_tool_source_up", "slow") == 1
    assert await output(gateway, "s.add", a=1, b=2) == {"sum": 3}
    # The version a caller holds: "unchanged", nothing else sent.
    same = await gateway.catalog(catalog.catalog_version)
    assert same.unchanged and not same.tools and same.catalog_version == catalog.catalog_version


async def test_list_changed_reaches_list_tools_and_every_answer_carries_the_version(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(
        {"mcp_servers": [{"name": "t", "command": tools_server(), "prefix": "t."}]}
    )
    before = (await gateway.catalog()).catalog_version
    assert await output(gateway, "t.grow", name="fresh") == {"added": "fresh"}
    await until(lambda: _has(gateway, "t.fresh"))
    after = (await gateway.catalog(before)).catalog_version
    assert after != before
    assert await output(gateway, "t.fresh", text="hi") == {"result": "fresh: hi"}
    assert gateway.catalog_version == after  # the InvokeTool answer said so too


async def test_name_collisions_follow_the_file_order_and_are_visible(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(
        {
            "tools": [{"name": "echo", "builtin": "echo"}],
            "mcp_servers": [
                {"name": "first", "command": tools_server()},
                {"name": "second", "command": tools_server(), "include": ["add", "pid"]},
            ],
        },
        tenant_tools={"acme": ["add"], "*": ["*"]},
    )
    catalog = await gateway.catalog()
    collisions = {(c.tool, c.served_by, c.skipped) for c in catalog.collisions}
    assert collisions == {
        ("echo", "tools", "first"),  # the file's own tools first
        ("add", "first", "second"),  # then the sources, in the file's order
        ("pid", "first", "second"),
    }
    served = {s.name: s.tools for s in catalog.sources}
    assert served["second"] == 0 and served["first"] == len(catalog.tools) - 1
    assert gauge("trellis_tool_name_collisions", "first") == 1
    assert gauge("trellis_tool_name_collisions", "second") == 2
    # A tenant limited to some tools learns only about those.
    with context.request_scope(tenant_id="acme"):
        limited = await gateway.catalog()
    assert [t.name for t in limited.tools] == ["add"]
    assert [(c.tool, c.skipped) for c in limited.collisions] == [("add", "second")]
    assert [s.name for s in limited.sources] == ["first"]


async def test_a_crashed_stdio_server_is_started_again_without_waiting_for_a_call(
    start_gateway: StartGateway,
) -> None:
    logs = JsonLogs(level="info")
    try:
        gateway = await start_gateway(
            {"mcp_servers": [{"name": "t", "command": tools_server(), "prefix": "t."}]}
        )
        first = (await output(gateway, "t.pid"))["pid"]
        os.kill(first, signal.SIGKILL)

        async def started_twice() -> bool:
            return len([e for e in logs.events() if "starting" in e.get("line", "")]) == 2

        await until(started_twice)  # no call was made meanwhile
        events = logs.events()
        assert any(e["event"] == "MCP server went away" for e in events)
        second = (await output(gateway, "t.pid"))["pid"]
        assert second != first
        [source] = (await gateway.catalog()).sources
        assert source.state == UP
    finally:
        logs.restore()
