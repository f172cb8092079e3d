"""The tools file: the bundled default, every kind of entry, policy overrides, errors that
name the file and the place inside it, start-up refusal (exit 2), and tool sources
(unreachable ones skipped, unchanged ones reused across loads)."""

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from tests.support.gateway_registries import load_registry
from trellis.runtime.channels import Channels
from trellis_toolgateway import loader
from trellis_toolgateway.loader import (
    BUNDLED_TOOLS_FILE,
    LoadOptions,
    ToolsFileError,
    check_tools_file,
)
from trellis_toolgateway.registry import Collision, RegistryHolder
from trellis_toolgateway.settings import GatewaySettings
from trellis_toolgateway.sources import SourceState
from trellis_toolgateway.tools.base import FunctionTool, Spec, Tool, ToolSource
from trellis_toolgateway.tools.command import CommandTool
from trellis_toolgateway.tools.config import McpServer

MCP_SERVER = Path(__file__).parent / "servers" / "mcp_tools_server.py"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_bundled_file_serves_the_builtins() -> None:
    registry = await load_registry(BUNDLED_TOOLS_FILE, LoadOptions())
    assert list(registry) == [
        "arithmetic", "run_command", "read_file", "list_dir", "sql_query", "sleep", "echo"
    ]  # fmt: skip
    specs = {s.name: s for s in registry.specs()}
    assert specs["arithmetic"].cache_ttl == 3600  # the builtin's own default survives
    assert specs["run_command"].cache_ttl == 3600
    assert specs["sql_query"].timeout == 6.0  # statement timeout 5 s from the file, +1 s
    assert "- `uptime`: uptime, load" in specs["run_command"].description
    assert registry.sources == []


FULL = """
version: 1
sandbox_root: box
sql_database: data/shop.db
tools:
  - name: calc
    builtin: arithmetic
    description: Evaluate arithmetic.
    version: "2"
    cache_ttl: 60
    max_concurrency: 4
    cost_nano_usd: 1500
    shared_cache: true
    retries: 2
  - {name: cat, builtin: read_file, max_bytes: 10}
  - {name: ls, builtin: list_dir}
  - {name: sql, builtin: sql_query, max_items: 2, timeout: 2}
  - name: ops
    kind: command
    description: Operator commands.
    timeout: 3
    max_output_bytes: 100
    commands:
      - command: wc -c {file}
        argv: [wc, -c, --, "{file}"]
        cache_ttl: 30
        keywords: [size]
        params:
          file: {pattern: '[\\w.]+', path: true, description: a file in the box}
  - name: create_item
    kind: http
    method: POST
    url: https://api.example.com/items/{kind}
    allowed_hosts: [api.example.com]
    headers: {Authorization: "Bearer ${SHOP_TOKEN}"}
    body_args: [item]
  - name: get_item
    kind: http
    url: https://api.example.com/items/{id}
    allowed_hosts: [API.example.com]
    cache_ttl: 10
"""


@pytest.fixture
def full(tmp_path: Path) -> Path:
    (tmp_path / "box").mkdir()
    write(tmp_path / "box" / "note.txt", "0123456789abcdef")
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "shop.db") as db:
        db.execute("CREATE TABLE t (x)")
        db.executemany("INSERT INTO t VALUES (?)", [(1,), (2,), (3,)])
    db.close()
    return write(tmp_path / "tools.yaml", FULL)


async def test_every_kind_of_entry_loads_with_its_policy(full: Path) -> None:
    registry = await load_registry(full, LoadOptions(environ={"SHOP_TOKEN": "t0k3n-value"}))
    specs = {s.name: s for s in registry.specs()}
    assert list(specs) == ["calc", "cat", "ls", "sql", "ops", "create_item", "get_item"]
    calc = specs["calc"]
    assert (calc.description, calc.version, calc.cache_ttl) == ("Evaluate arithmetic.", "2", 60)
    assert (calc.max_concurrency, calc.cost_nano_usd, calc.shared_cache, calc.retries) == (
        4,
        1500,
        True,
        2,
    )
    assert calc.input_schema["required"] == ["expression"]  # schema from the builtin
    assert specs["ops"].timeout == 4.0 and specs["ops"].cache_ttl == 30
    assert specs["ops"].description.startswith("Operator commands.\n- `wc -c {file}`: size")
    assert specs["create_item"].side_effects is True  # POST: side-effecting unless told
    assert specs["get_item"].side_effects is False and specs["get_item"].cache_ttl == 10

    def entry(name: str) -> Tool:
        found = registry.get(name)
        assert found is not None
        return found.tool

    # Paths are relative to the file: the sandbox and the database are found and used.
    assert (await entry("cat").run({"path": "note.txt"}))["content"] == "0123456789"
    assert [e["name"] for e in (await entry("ls").run({}))["entries"]] == ["note.txt"]
    rows = await entry("sql").run({"query": "SELECT x FROM t ORDER BY x"})
    assert rows == {"columns": ["x"], "rows": [[1], [2]], "truncated": True}
    ops = entry("ops")
    assert isinstance(ops, CommandTool)
    assert (await ops.run({"command": "wc -c note.txt"}))["stdout"].startswith("16 ")


def test_command_settings_are_defaults_the_file_can_override(tmp_path: Path) -> None:
    text = """
tools:
  - name: a
    kind: command
    commands: [{command: nproc, argv: [nproc]}]
  - name: b
    kind: command
    timeout: 2
    commands: [{command: nproc, argv: [nproc]}]
"""
    options = LoadOptions(command_timeout=7.0)
    registry = loader.declared_registry(write(tmp_path / "t.yaml", text), options)
    timeouts = {s.name: s.timeout for s in registry.specs()}
    assert timeouts == {"a": 8.0, "b": 3.0}


BAD_FILES = [
    ("tools:\n  - name: x\n    builtin: echo\n   bad: indent\n", "invalid YAML: line 4, column 4"),
    ("- just\n- a list", "(top level): expected a mapping with a tools list, got list"),
    ("", "got an empty file"),
    ("tools:\n  - {name: x, builtin: teleport}", "tools[0].builtin: Input should be 'arithmetic'"),
    ("tools:\n  - {name: x, builtin: echo, colour: red}", "tools[0].colour: Extra inputs"),
    ("tools:\n  - {name: x, kind: shell}", "tools[0]: Input tag 'shell'"),
    ("tools:\n  - {name: 9x, builtin: echo}", "tools[0].name: String should match pattern"),
    (
        "tools:\n  - {name: x, builtin: echo}\n  - {name: x, builtin: sleep}",
        "tool names must be unique: x",
    ),
    (
        "tools:\n  - {name: x, builtin: echo, input_schema: {type: nope}}",
        "tools[0].input_schema: not a valid JSON Schema at type: 'nope' is not valid",
    ),
    (
        """tools:
  - {name: e, builtin: echo}
  - name: c
    kind: command
    commands:
      - {command: uname -a, argv: [uname, -a]}
      - command: df -h {path}
        argv: [df, -h, "{path}"]
        params: {path: {pattern: '([a-z]+', path: true}}
""",
        "tools[1].commands[1].params.path.pattern: invalid regular expression '([a-z]+'",
    ),
    (
        "tools:\n  - {name: h, kind: http, url: 'ftp://x/y', allowed_hosts: [x]}",
        "tools[0].url: must be an absolute http:// or https:// URL",
    ),
    (
        "tools:\n  - {name: h, kind: http, url: 'https://x/', allowed_hosts: [x],"
        " headers: {X-Key: '${NOT_SET_ANYWHERE_42}'}}",
        "tools[0].headers.X-Key: environment variable NOT_SET_ANYWHERE_42 is not set",
    ),
    ("sandbox_root: no/such/dir\ntools: []", "sandbox_root: "),
    ("sql_database: missing.db\ntools: []", "sql_database: "),
    ("mcp_servers:\n  - {name: m}", "mcp_servers[0]: give exactly one of command"),
    ("mcp_servers:\n  - {name: m, command: []}", "mcp_servers[0].command: List should have"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_bad_files_are_rejected_naming_the_file_and_the_place(
    text: str, expected: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "tools.yaml", text)
    with pytest.raises(ToolsFileError) as raised:
        check_tools_file(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_a_section_whose_implementation_is_missing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "trellis_toolgateway.tools.mcp_source", None)
    path = write(tmp_path / "t.yaml", "mcp_servers:\n  - {name: m, url: 'http://127.0.0.1:1/'}")
    with pytest.raises(ToolsFileError, match="mcp_servers: MCP tool sources are not available"):
        check_tools_file(path)


async def test_a_grpc_section_needs_channels(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", "grpc_tool_servers:\n  - {name: g, target: '127.0.0.1:1'}")
    with pytest.raises(ToolsFileError, match=r"grpc_tool_servers\[0\]: no gRPC channels"):
        await load_registry(path, LoadOptions())


def test_settings_validate_the_tools_file(tmp_path: Path) -> None:
    assert GatewaySettings().tools_path == BUNDLED_TOOLS_FILE
    good = write(tmp_path / "good.yaml", "tools:\n  - {name: echo, builtin: echo}")
    assert GatewaySettings(tools_file=good).tools_path == good
    bad = write(tmp_path / "bad.yaml", "tools:\n  - {name: x, builtin: teleport}")
    with pytest.raises(ValidationError, match=r"tools\[0\]\.builtin"):
        GatewaySettings(tools_file=bad)
    with pytest.raises(ValidationError, match="cannot read the file"):
        GatewaySettings(tools_file=tmp_path / "missing.yaml")


def test_a_bad_file_stops_the_service_at_start_up_with_one_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "tools:\n  - {name: x, builtin: teleport}")
    env = {**os.environ, "TRELLIS_TOOLS_FILE": str(bad), "TRELLIS_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "trellis_toolgateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trellis-toolgateway: invalid configuration: TRELLIS_TOOLS_FILE:")
    assert f"{bad}: tools[0].builtin" in lines[0]


# -- sources -----------------------------------------------------------------------------


class FakeSource(ToolSource):
    """Stands in for McpSource: its tools, or the error it raises when asked."""

    made: list["FakeSource"] = []

    def __init__(self, config: McpServer, **_: object) -> None:
        self.config = config
        self.asked = 0
        self.closed = 0
        FakeSource.made.append(self)

    async def tools(self) -> list[Tool]:
        self.asked += 1
        if self.config.url and "down" in self.config.url:
            raise ConnectionError("connection refused")

        async def run(args: dict) -> dict:
            return {"from": self.config.name}

        names = ["echo"] if "clash" in self.config.name else ["ping"]
        return [
            FunctionTool(Spec(f"{self.config.prefix}{n}", "d", {"type": "object"}, {}), run)
            for n in names
        ]

    async def aclose(self) -> None:
        self.closed += 1


@pytest.fixture
def fake_sources(monkeypatch: pytest.MonkeyPatch) -> list[FakeSource]:
    FakeSource.made = []
    monkeypatch.setattr(loader, "_source_classes", lambda *_: {"mcp_servers": FakeSource})
    return FakeSource.made


SOURCES = """
tools:
  - {name: echo, builtin: echo}
mcp_servers:
  - {name: up, url: "http://up.invalid/mcp", prefix: "up_"}
  - {name: down, url: "http://down.invalid/mcp", prefix: "down_"}
  - {name: clash, url: "http://clash.invalid/mcp"}
"""


async def test_unreachable_sources_are_skipped_and_the_rest_loads(
    tmp_path: Path, fake_sources: list[FakeSource]
) -> None:
    path = write(tmp_path / "t.yaml", SOURCES)
    with capture_logs() as events:
        registry = await load_registry(path, LoadOptions())
    assert list(registry) == ["echo", "up_ping"]
    # Every source is kept, reachable or not, so the registry can close them all.
    assert [h.source for h in registry.sources] == fake_sources
    assert [h.state for h in registry.sources] == [
        SourceState.UP,
        SourceState.DOWN,
        SourceState.UP,
    ]
    assert "ConnectionError: connection refused" in registry.sources[1].error
    warnings = {(e["event"], e.get("source")) for e in events}
    assert ("tool source unavailable; listing it again in the background", "down") in warnings
    # The tools file's own tools win a name; the source's tool is a recorded collision.
    assert registry.collisions == [Collision("echo", "tools", "clash")]
    assert registry.served == {"up": 1, "down": 0, "clash": 0}
    await registry.aclose()
    assert [s.closed for s in fake_sources] == [1, 1, 1]


async def test_unchanged_sources_are_reused_on_the_next_load(
    tmp_path: Path, fake_sources: list[FakeSource]
) -> None:
    path = write(tmp_path / "t.yaml", SOURCES)
    first = await load_registry(path, LoadOptions())
    write(path, SOURCES.replace('prefix: "up_"', 'prefix: "up2_"'))
    second = await load_registry(path, LoadOptions(), previous=first)
    assert list(second) == ["echo", "up2_ping"]
    _, down, clash, new_up = fake_sources
    assert [h.source for h in second.sources] == [new_up, down, clash]
    # The reused handles are the same objects: still listing, not started twice.
    assert second.sources[1] is first.sources[1]
    await second.aclose()
    await first.sources[0].aclose()


async def test_a_source_that_answers_late_joins_the_catalog_without_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Late(FakeSource):
        """Refuses its first three listings, then answers."""

        async def tools(self) -> list[Tool]:
            if self.asked < 3:
                self.asked += 1
                raise ConnectionError("not yet")
            return await super().tools()  # counted there

    monkeypatch.setattr(loader, "_source_classes", lambda *_: {"mcp_servers": Late})
    path = write(tmp_path / "t.yaml", "mcp_servers:\n  - {name: late, url: 'http://late/'}")
    options = LoadOptions(source_timeout=0.2, source_retry_max=0.05)
    holder = RegistryHolder(await load_registry(path, options))
    try:
        handle = holder.current.sources[0]
        assert len(holder) == 0  # the load did not wait for it
        for _ in range(200):
            if "ping" in holder:
                break
            await asyncio.sleep(0.01)
        assert list(holder) == ["ping"]
        assert handle.state is SourceState.UP and handle.error == ""
        assert handle.source.asked == 4  # type: ignore[attr-defined]
    finally:
        await holder.aclose()


async def test_slow_sources_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Silent(FakeSource):
        async def tools(self) -> list[Tool]:
            await asyncio.sleep(30)
            return []

    monkeypatch.setattr(loader, "_source_classes", lambda *_: {"mcp_servers": Silent})
    path = write(tmp_path / "t.yaml", "mcp_servers:\n  - {name: s, url: 'http://s.invalid/'}")
    registry = await load_registry(path, LoadOptions(source_timeout=0.2))
    assert len(registry) == 0 and len(registry.sources) == 1
    assert registry.sources[0].state is SourceState.CONNECTING
    await registry.aclose()


async def test_real_sources_mcp_over_stdio_and_an_unreachable_grpc_server(tmp_path: Path) -> None:
    text = f"""
tools:
  - {{name: echo, builtin: echo}}
mcp_servers:
  - name: local
    command: [{sys.executable!r}, {str(MCP_SERVER)!r}]
    prefix: "mcp_"
grpc_tool_servers:
  - {{name: gone, target: "127.0.0.1:1", prefix: "rpc_"}}
"""
    path = write(tmp_path / "tools.yaml", text)
    channels = Channels()
    try:
        registry = await load_registry(path, LoadOptions(channels=channels, source_timeout=10.0))
        try:
            assert "echo" in registry and "mcp_add" in registry
            assert not any(name.startswith("rpc_") for name in registry)
            entry = registry.get("mcp_add")
            assert entry is not None
            assert await entry.tool.run({"a": 2, "b": 3}) == {"sum": 5}
            assert len(registry.sources) == 2
        finally:
            await registry.aclose()
    finally:
        await channels.close()
