"""Command tools: the shipped allow-list, shell-syntax rejection (no process ever starts),
real runs, timeouts that kill, bounded output, per-command TTLs, the planner-facing
description, and the template rules (patterns, option injection, sandboxed paths)."""

import asyncio
import os
import platform
import re
import sys
from pathlib import Path

import pytest

from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.loader import BUNDLED_TOOLS_FILE, read_tools_file
from trellis_toolgateway.tools import config
from trellis_toolgateway.tools.base import ToolError
from trellis_toolgateway.tools.command import COMMAND_ENV, CommandTool, Template
from trellis_toolgateway.tools.sandbox import Sandbox


def shipped_templates() -> list[Template]:
    """The run_command templates of the bundled tools.yaml."""
    [decl] = [t for t in read_tools_file(BUNDLED_TOOLS_FILE).tools if t.name == "run_command"]
    assert isinstance(decl, config.CommandTool)
    return [Template.from_config(c) for c in decl.commands]


def shipped(sandbox: Path | None = None, **kwargs) -> CommandTool:
    root = sandbox or BUNDLED_TOOLS_FILE.parent / "sandbox"
    return CommandTool(shipped_templates(), sandbox=Sandbox(root), **kwargs)


def template(command: str, argv: list[str], **params: dict) -> Template:
    return Template.from_config(
        config.CommandTemplate(command=command, argv=argv, params=params, cache_ttl=1)
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
    resolved = shipped().parse(command)
    assert resolved.argv == argv
    assert resolved.text == " ".join(argv)


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
    "uname",
    "id",
    "UNAME -a",
    "uname -a -a",
    "sh -c 'uname -a'",
    "/usr/bin/uname -a",
    "uname -a # comment",
    "df -h a b",
    "df -H x",
]


@pytest.mark.parametrize(
    ("command", "reason"),
    [(c, "SHELL_SYNTAX_REJECTED") for c in SHELL_SYNTAX]
    + [(c, "COMMAND_NOT_ALLOWED") for c in NOT_ALLOWED]
    + [
        ("df -h /etc", "PATH_OUTSIDE_SANDBOX"),
        ("df -h ../../..", "PATH_OUTSIDE_SANDBOX"),
        ("df -h --output=x", "ARG_PATTERN_MISMATCH"),
        ("df -h 'a b'", "ARG_PATTERN_MISMATCH"),
    ],
)
async def test_rejected_commands_never_start_a_process(command: str, reason: str) -> None:
    launcher = RecordingLauncher()
    tool = shipped(launcher=launcher)
    with pytest.raises(InvalidArgument) as raised:
        await tool.run({"command": command})
    assert raised.value.reason == reason
    assert [v.field for v in raised.value.violations] == ["args.command"]
    assert raised.value.metadata == {"tool": "run_command"}
    assert launcher.calls == []
    assert tool.cache_ttl_for({"command": command}) == 0


async def test_uname_runs_for_real_with_argv_and_minimal_env() -> None:
    launcher = RecordingLauncher()
    output = await shipped(launcher=launcher).run({"command": "uname   -a"})
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
    tool = shipped()
    assert int((await tool.run({"command": "nproc"}))["stdout"]) >= 1
    assert re.search(r"\b20\d\d\b", (await tool.run({"command": "date -u"}))["stdout"])


async def test_df_of_a_sandbox_path_runs_with_the_resolved_path_after_double_dash(
    tmp_path: Path,
) -> None:
    (tmp_path / "data").mkdir()
    launcher = RecordingLauncher()
    output = await shipped(tmp_path, launcher=launcher).run({"command": "df -h data/../data"})
    assert output["exit_code"] == 0 and "Filesystem" in output["stdout"]
    assert output["command"] == "df -h data/../data"  # the caller's text, normalised
    [(argv, kwargs)] = launcher.calls
    root = Sandbox(tmp_path).root  # tmp_path itself may sit behind a symlink
    assert argv == ("df", "-h", "--", f"{root}/data")
    assert kwargs["cwd"] == root


async def test_output_is_cut_at_the_limit_and_marked_truncated() -> None:
    launcher = RecordingLauncher(replace_with=python("print('x' * 100000)"))
    output = await shipped(launcher=launcher, max_output_bytes=100).run({"command": "uptime"})
    assert output["stdout"] == "x" * 100
    assert output["truncated"] is True
    assert output["exit_code"] == 0


async def test_timeout_kills_the_process() -> None:
    launcher = RecordingLauncher(replace_with=python("import time; time.sleep(30)"))
    tool = shipped(launcher=launcher, timeout=0.3)
    with pytest.raises(ToolError) as raised:
        await tool.run({"command": "uptime"})
    assert raised.value.code == "TOOL_TIMEOUT"
    assert raised.value.retryable
    [process] = launcher.processes
    assert process.returncode is not None  # reaped, not left running


async def test_cancelling_the_call_kills_the_process() -> None:
    launcher = RecordingLauncher(replace_with=python("import time; time.sleep(30)"))
    task = asyncio.create_task(shipped(launcher=launcher, timeout=30).run({"command": "nproc"}))
    await launcher.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert launcher.processes[0].returncode is not None


async def test_missing_program_is_a_tool_failure() -> None:
    async def launcher(*argv: str, **kwargs) -> asyncio.subprocess.Process:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(ToolError) as raised:
        await shipped(launcher=launcher).run({"command": "free -h"})
    assert raised.value.code == "COMMAND_UNAVAILABLE"


def test_cache_ttl_per_command_and_spec_ttl_is_the_max() -> None:
    tool = shipped()
    assert tool.cache_ttl_for({"command": "uname -a"}) == 3600
    assert tool.cache_ttl_for({"command": "df -h"}) == 300
    assert tool.cache_ttl_for({"command": "df -h ."}) == 300
    assert tool.cache_ttl_for({"command": "uptime"}) == 5
    assert tool.cache_ttl_for({"command": "date -u"}) == 5
    assert tool.spec.cache_ttl == max(t.cache_ttl for t in tool.templates) == 3600
    assert not tool.spec.side_effects


def test_description_lists_every_command_one_per_line_for_the_planner() -> None:
    lines = re.findall(r"^- `([^`]+)`: (.+)$", shipped().spec.description, re.MULTILINE)
    by_command = {cmd: [k.strip() for k in words.split(",")] for cmd, words in lines}
    assert set(by_command) == {
        "uname -a",
        "uname -s",
        "uname -r",
        "df -h",
        "df -h {path}",
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
    assert "- `df -h`: disk, disk usage, disk space, storage" in shipped().spec.description
    # No keyword of the templated command collides with the demo goal's words.
    assert not {"disk usage", "disk", "os", "uptime"} & set(by_command["df -h {path}"])


# -- sentinel files: whatever the attack, the file it would create never appears ----------


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "outside" / "SENTINEL"


@pytest.fixture
def sandbox(tmp_path: Path, sentinel: Path) -> Path:
    """tmp/sandbox (with a link to the outside dir) next to tmp/outside (the sentinel's)."""
    root = tmp_path / "sandbox"
    root.mkdir()
    sentinel.parent.mkdir()
    (root / "escape").symlink_to(sentinel.parent, target_is_directory=True)
    return root


def attack_tool(sandbox: Path, **kwargs) -> CommandTool:
    """Real programs that *could* create the sentinel, were their arguments not checked."""
    templates = [
        template("uname -a", ["uname", "-a"]),
        template("touch {path}", ["touch", "{path}"], path={"pattern": r"[\w./-]+", "path": True}),
        # A deliberately loose pattern: only the leading-dash rule stops option injection.
        template("sort {file}", ["sort", "{file}"], file={"pattern": r"[\w./=-]+"}),
        template("find {dir} -name {name}", ["find", "{dir}", "-name", "{name}"],
                 dir={"pattern": r"[\w./-]+", "path": True}, name={"pattern": r"[\w.*-]+"}),
        template("git log -n {count}", ["git", "log", "-n", "{count}"], count={"pattern": r"\d+"}),
    ]  # fmt: skip
    return CommandTool(templates, sandbox=Sandbox(sandbox), **kwargs)


def attacks(sentinel: Path) -> list[tuple[str, str]]:
    s = str(sentinel)
    return [
        (f"uname -a; touch {s}", "SHELL_SYNTAX_REJECTED"),
        (f"uname -a && touch {s}", "SHELL_SYNTAX_REJECTED"),
        (f"uname -a | tee {s}", "SHELL_SYNTAX_REJECTED"),
        (f"uname -a $(touch {s})", "SHELL_SYNTAX_REJECTED"),
        (f"uname -a `touch {s}`", "SHELL_SYNTAX_REJECTED"),
        (f"uname -a > {s}", "SHELL_SYNTAX_REJECTED"),
        (f"uname -a >> {s}", "SHELL_SYNTAX_REJECTED"),
        (f"sort --output={s}", "ARG_PATTERN_MISMATCH"),
        (f"sort -o{s}", "ARG_PATTERN_MISMATCH"),
        (f"find . -name x -exec touch {s} +", "COMMAND_NOT_ALLOWED"),
        (f"find -exec -name touch {s} +", "COMMAND_NOT_ALLOWED"),
        ("find . -name -delete", "ARG_PATTERN_MISMATCH"),
        (f"git -c core.pager=touch{s} log -n 1", "COMMAND_NOT_ALLOWED"),
        ("git log -n -c", "ARG_PATTERN_MISMATCH"),
        (f"touch {s}", "PATH_OUTSIDE_SANDBOX"),
        ("touch ../outside/SENTINEL", "PATH_OUTSIDE_SANDBOX"),
        ("touch escape/SENTINEL", "PATH_OUTSIDE_SANDBOX"),
        ("touch ./escape/../escape/SENTINEL", "PATH_OUTSIDE_SANDBOX"),
        (f"find {sentinel.parent} -name x", "PATH_OUTSIDE_SANDBOX"),
    ]


async def test_attacks_are_rejected_and_the_sentinel_never_appears(
    sandbox: Path, sentinel: Path
) -> None:
    launcher = RecordingLauncher()
    tool = attack_tool(sandbox, launcher=launcher)
    for command, reason in attacks(sentinel):
        with pytest.raises(InvalidArgument) as raised:
            await tool.run({"command": command})
        assert raised.value.reason == reason, command
        assert [v.field for v in raised.value.violations] == ["args.command"]
    await asyncio.sleep(0.1)  # anything started in the background would have run by now
    assert launcher.calls == []
    assert os.listdir(sentinel.parent) == []  # the sentinel, or anything else


async def test_controls_show_the_same_programs_do_run_when_allowed(
    sandbox: Path, sentinel: Path
) -> None:
    """The attack tool is not inert: inside the sandbox touch creates a file, and a
    parameter that allows a leading dash lets ``--output=`` through (so the default
    rule, not luck, is what protects the sentinel above)."""
    tool = attack_tool(sandbox)
    assert (await tool.run({"command": "touch inside.txt"}))["exit_code"] == 0
    assert "inside.txt" in os.listdir(sandbox)
    found = await tool.run({"command": "find . -name inside.txt"})
    assert found["stdout"].strip().endswith("inside.txt")

    loose = CommandTool(
        [template("sort {file}", ["sort", "{file}"],
                  file={"pattern": r"[\w./=-]+", "allow_leading_dash": True})],
        sandbox=Sandbox(sandbox),
    )  # fmt: skip
    await loose.run({"command": f"sort --output={sentinel}"})
    assert os.listdir(sentinel.parent) == [sentinel.name]


def test_template_rules_are_checked_when_the_file_loads() -> None:
    def bad(**fields) -> str:
        with pytest.raises(ValueError) as raised:
            config.CommandTemplate(**fields)
        return str(raised.value)

    assert "same placeholders" in bad(command="ls {p}", argv=["ls"], params={"p": {"pattern": "x"}})
    assert "exactly the placeholders" in bad(command="ls {p}", argv=["ls", "{p}"])
    assert "invalid regular expression" in bad(
        command="ls {p}", argv=["ls", "{p}"], params={"p": {"pattern": "(["}}
    )
    assert "shell syntax" in bad(command="ls; id", argv=["ls"])
    assert "whole word" in bad(
        command="ls --x={p}", argv=["ls", "{p}"], params={"p": {"pattern": "x"}}
    )
    assert "program" in bad(command="{p} x", argv=["{p}"], params={"p": {"pattern": "x"}})


def test_first_matching_template_wins_and_mismatch_reports_the_parameter() -> None:
    tool = CommandTool(
        [
            template("show {n}", ["echo", "number", "{n}"], n={"pattern": r"\d+"}),
            template("show {w}", ["echo", "word", "{w}"], w={"pattern": r"[a-z]+"}),
        ]
    )
    assert tool.parse("show 12").argv == ("echo", "number", "12")
    assert tool.parse("show abc").argv == ("echo", "word", "abc")
    with pytest.raises(InvalidArgument) as raised:
        tool.parse("show ABC")
    assert raised.value.reason == "ARG_PATTERN_MISMATCH"
    assert "{n} must match" in raised.value.message
    with pytest.raises(ValueError, match="sandbox"):
        CommandTool([template("touch {p}", ["touch", "{p}"], p={"pattern": ".+", "path": True})])
