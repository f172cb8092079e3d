"""Reloading the tools file: edits take effect within the poll interval, a broken file is
logged and ignored (the last good registry stays), fixing it reloads; the same through a
real gateway server over gRPC."""

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_value, to_struct
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_toolgateway.loader import LoadOptions, ToolsFileError
from trellis_toolgateway.reload import ToolsFileWatcher
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings

INTERVAL = 0.05
ECHO = "tools:\n  - {name: echo, builtin: echo}\n"
ECHO_AND_CALC = ECHO + "  - {name: calc, builtin: arithmetic}\n"
BROKEN = (
    ECHO
    + "  - name: run\n    kind: command\n    commands:\n"
    + ("      - {command: 'ls {p}', argv: [ls, '{p}'], params: {p: {pattern: '(['}}}\n")
)


async def eventually(predicate: Callable[[], bool], within: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def write(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[ToolsFileWatcher]:
    path = tmp_path / "tools.yaml"
    write(path, ECHO)
    watcher = ToolsFileWatcher(path, LoadOptions(), interval=INTERVAL)
    await watcher.load()
    watcher.start()
    yield watcher
    await watcher.aclose()
    assert watcher.holder is not None
    await watcher.holder.aclose()


def names(watcher: ToolsFileWatcher) -> list[str]:
    assert watcher.holder is not None
    return list(watcher.holder)


async def test_an_edit_is_picked_up_within_the_poll_interval(watched: ToolsFileWatcher) -> None:
    assert names(watched) == ["echo"]
    write(watched.path, ECHO_AND_CALC)
    await eventually(lambda: names(watched) == ["echo", "calc"], within=20 * INTERVAL)
    assert watched.reloads == 1


async def test_a_broken_file_keeps_the_last_good_registry_until_fixed(
    watched: ToolsFileWatcher,
) -> None:
    with capture_logs() as events:
        write(watched.path, BROKEN)
        await eventually(lambda: watched.last_error is not None)
        await asyncio.sleep(5 * INTERVAL)  # later polls do not retry (or log) the same bytes
    assert names(watched) == ["echo"]
    errors = [e for e in events if e["log_level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["event"] == "tools file rejected; the last good registry stays in force"
    assert errors[0]["file"] == str(watched.path)
    assert (
        f"{watched.path}: tools[1].commands[0].params.p.pattern: invalid regular expression"
        in (errors[0]["error"])
    )
    # The old registry still answers calls.
    assert watched.holder is not None
    entry = watched.holder.get("echo")
    assert entry is not None and await entry.tool.run({"value": 1}) == 1

    write(watched.path, ECHO_AND_CALC)
    await eventually(lambda: names(watched) == ["echo", "calc"])
    assert watched.last_error is None


async def test_a_missing_file_is_an_error_and_an_atomic_replace_is_seen(
    watched: ToolsFileWatcher,
) -> None:
    os.remove(watched.path)
    await eventually(lambda: watched.last_error is not None)
    assert "the file is missing" in (watched.last_error or "")
    assert names(watched) == ["echo"]
    staged = watched.path.with_suffix(".new")
    write(staged, ECHO_AND_CALC)
    os.replace(staged, watched.path)  # how editors and ConfigMaps update files
    await eventually(lambda: names(watched) == ["echo", "calc"])


async def test_touching_without_changing_reloads_nothing(watched: ToolsFileWatcher) -> None:
    assert watched.holder is not None
    before = watched.holder.current
    os.utime(watched.path, ns=(1, 1))
    await asyncio.sleep(6 * INTERVAL)
    assert watched.holder.current is before and watched.reloads == 0


async def test_check_can_be_driven_by_hand_and_interval_zero_never_polls(tmp_path: Path) -> None:
    path = tmp_path / "tools.yaml"
    write(path, ECHO)
    watcher = ToolsFileWatcher(path, LoadOptions(), interval=0)
    holder = await watcher.load()
    watcher.start()
    write(path, ECHO_AND_CALC + "\n")
    await asyncio.sleep(0.1)
    assert list(holder) == ["echo"]  # nobody polls
    assert await watcher.check() is True
    assert list(holder) == ["echo", "calc"]
    assert await watcher.check() is False  # nothing new


async def test_first_load_of_a_bad_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "tools.yaml"
    write(path, BROKEN)
    with pytest.raises(ToolsFileError, match=r"tools\[1\]\.commands\[0\]"):
        await ToolsFileWatcher(path, LoadOptions(), interval=1).load()


def request(tool: str, args: dict) -> toolgateway_pb2.InvokeToolRequest:
    call = common_pb2.ToolCall(node_id="n1", tool=tool, args=to_struct(args))
    return toolgateway_pb2.InvokeToolRequest(call=call)


async def test_a_running_gateway_serves_the_edited_file(serve, channels, tmp_path: Path) -> None:
    path = tmp_path / "tools.yaml"
    write(path, ECHO)
    settings = GatewaySettings(
        port=0, metrics_port=0, tools_file=path, tools_reload_seconds=INTERVAL
    )
    server = await serve(NAME, build, settings)
    gateway = ToolGatewayClient(channels.get(server.target), timeout=10)
    assert [t.name for t in await gateway.list_tools()] == ["echo"]

    write(path, ECHO_AND_CALC)
    for _ in range(100):
        if len(await gateway.list_tools()) == 2:
            break
        await asyncio.sleep(INTERVAL)
    assert [t.name for t in await gateway.list_tools()] == ["echo", "calc"]
    outcome = await gateway.invoke(request("calc", {"expression": "6 * 7"}))
    assert from_value(outcome.output) == {"result": 42}

    write(path, BROKEN)
    await asyncio.sleep(10 * INTERVAL)
    assert [t.name for t in await gateway.list_tools()] == ["echo", "calc"]
