"""run_command: the allow-list, shell-syntax rejection (no process ever starts), real runs,
timeouts that kill, bounded output, per-command TTLs and the planner-facing description."""

import asyncio
import platform
import re
import sys

import pytest

from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.tools.base import ToolError
from trellis_toolgateway.tools.command import (
    ALLOWED_COMMANDS,
    COMMAND_ENV,
    CommandTool,
    parse_command,
)


class RecordingLauncher:
    """Records every launch; optionally replaces the program with another argv."""

    def __init__(self, replace_with: list[str] | None = None) -> None:
        self.calls: list[tuple[tuple[str, ...], dict]] = []
        self.processes: list[asyncio.subprocess.Process] = []
        self.started = asyncio.Event()
        self._replace_with = replace_with

    async def __call__(self, *argv: str, **kwargs) -> asyncio.subprocess.Process:
        self.calls.append((argv, kwargs))
        program = self._replace_with or list(argv)
        if self._replace_with:
            kwargs = {**kwargs, "env": None}  # python needs more than PATH to start
        process = await asyncio.create_subprocess_exec(*program, **kwargs)
        self.processes.append(process)
        self.started.set()
        return process


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("uname -a", ("uname", "-a")),
        ("  uname    -a  ", ("uname", "-a")),
        ("uname '-a'", ("uname", "-a")),
        ("df -h", ("df", "-h")),
        ("uptime", ("uptime",)),
        ("date -u", ("date", "-u")),
    ],
)
def test_allowed_commands_match_after_whitespace_normalisation(
    command: str, argv: tuple[str, ...]
) -> None:
    assert parse_command(command).argv == argv


SHELL_SYNTAX = [
    "uname; id",
    "$(id)",
    "uname -a && id",
    "`id`",
    "uname -a | cat",
    "uname -a > /tmp/out",
    "uname -a < /etc/passwd",
    "uname -a\nid",
    "uname -a &",
    "(uname -a)",
    "uname \\-a",
    "echo ${HOME}",
    "uname 'unbalanced",  # shlex cannot split it
]
NOT_ALLOWED = [
    "rm -rf /",
    "uname --help",
    "df -h /etc",
    "uname",
    "id",
    "UNAME -a",
    "uname -a -a",
    "sh -c 'uname -a'",
    "/usr/bin/uname -a",
    "uname -a # comment",
]


@pytest.mark.parametrize(
    ("command", "reason"),
    [(c, "SHELL_SYNTAX_REJECTED") for c in SHELL_SYNTAX]
    + [(c, "COMMAND_NOT_ALLOWED") for c in NOT_ALLOWED],
)
async def test_rejected_commands_never_start_a_process(command: str, reason: str) -> None:
    launcher = RecordingLauncher()
    tool = CommandTool(launcher=launcher)
    with pytest.raises(InvalidArgument) as raised:
        await tool.run({"command": command})
    assert raised.value.reason == reason
    assert [v.field for v in raised.value.violations] == ["args.command"]
    assert launcher.calls == []
    assert tool.cache_ttl_for({"command": command}) == 0


async def test_uname_runs_for_real_with_argv_and_minimal_env() -> None:
    launcher = RecordingLauncher()
    output = await CommandTool(launcher=launcher).run({"command": "uname   -a"})
    assert output["command"] == "uname -a"
    assert output["exit_code"] == 0
    assert platform.system() in output["stdout"]
    assert output["truncated"] is False
    [(argv, kwargs)] = launcher.calls
    assert argv == ("uname", "-a")
    assert kwargs["env"] == COMMAND_ENV
    assert "shell" not in kwargs
    assert kwargs["stdin"] == asyncio.subprocess.DEVNULL


async def test_nproc_and_date_run_for_real() -> None:
    tool = CommandTool()
    assert int((await tool.run({"command": "nproc"}))["stdout"]) >= 1
    assert re.search(r"\b20\d\d\b", (await tool.run({"command": "date -u"}))["stdout"])


async def test_output_is_cut_at_the_limit_and_marked_truncated() -> None:
    launcher = RecordingLauncher(replace_with=python("print('x' * 100000)"))
    output = await CommandTool(launcher=launcher, max_output_bytes=100).run({"command": "uptime"})
    assert output["stdout"] == "x" * 100
    assert output["truncated"] is True
    assert output["exit_code"] == 0


async def test_timeout_kills_the_process() -> None:
    launcher = RecordingLauncher(replace_with=python("import time; time.sleep(30)"))
    tool = CommandTool(launcher=launcher, timeout=0.3)
    with pytest.raises(ToolError) as raised:
        await tool.run({"command": "uptime"})
    assert raised.value.code == "TOOL_TIMEOUT"
    assert raised.value.retryable
    [process] = launcher.processes
    assert process.returncode is not None  # reaped, not left running


async def test_cancelling_the_call_kills_the_process() -> None:
    launcher = RecordingLauncher(replace_with=python("import time; time.sleep(30)"))
    task = asyncio.create_task(CommandTool(launcher=launcher, timeout=30).run({"command": "nproc"}))
    await launcher.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert launcher.processes[0].returncode is not None


async def test_missing_program_is_a_tool_failure() -> None:
    async def launcher(*argv: str, **kwargs) -> asyncio.subprocess.Process:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(ToolError) as raised:
        await CommandTool(launcher=launcher).run({"command": "free -h"})
    assert raised.value.code == "COMMAND_UNAVAILABLE"


def test_cache_ttl_per_command_and_spec_ttl_is_the_max() -> None:
    tool = CommandTool()
    assert tool.cache_ttl_for({"command": "uname -a"}) == 3600
    assert tool.cache_ttl_for({"command": "df -h"}) == 300
    assert tool.cache_ttl_for({"command": "uptime"}) == 5
    assert tool.cache_ttl_for({"command": "date -u"}) == 5
    assert tool.spec.cache_ttl == max(c.cache_ttl for c in ALLOWED_COMMANDS) == 3600
    assert not tool.spec.side_effects


def test_description_lists_every_command_one_per_line_for_the_planner() -> None:
    lines = re.findall(r"^- `([^`]+)`: (.+)$", CommandTool().spec.description, re.MULTILINE)
    by_command = {cmd: [k.strip() for k in words.split(",")] for cmd, words in lines}
    assert set(by_command) == {
        "uname -a",
        "uname -s",
        "uname -r",
        "df -h",
        "uptime",
        "nproc",
        "free -h",
        "hostname",
        "date -u",
        "whoami",
    }
    assert {"disk usage", "storage"} <= set(by_command["df -h"])
    assert {"operating system", "kernel"} <= set(by_command["uname -a"])
    assert "memory" in by_command["free -h"]
    assert "cores" in by_command["nproc"]
    assert "user" in by_command["whoami"]
