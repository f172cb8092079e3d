"""``run_command``: run one of a few read-only system commands, never a shell.

The only way a string becomes a process here is an exact match against
``ALLOWED_COMMANDS``: the text is first refused if it contains any shell syntax at all
(so ``uname; id`` is an error, not ``uname`` plus a surprise), then split with
``shlex`` (whitespace and quoting normalised) and compared, argv for argv, with the
allow-list. The process is started with ``create_subprocess_exec`` (argv, no shell),
a minimal environment, no stdin, a hard timeout (killed, not just abandoned) and
bounded output. The launcher is injectable so tests can prove rejected commands never
start a process.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis_toolgateway.tools.base import Json, Spec, Tool, ToolError

#: Characters that mean something to a shell. Their presence alone rejects a command.
SHELL_SYNTAX = frozenset(";&|$`<>()\\\n\r\x00")

#: The whole environment of a command: a fixed PATH (not the service's own) and C locale.
COMMAND_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C"}

_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class AllowedCommand:
    argv: tuple[str, ...]
    #: Seconds a result stays fresh: a kernel version for an hour, the load for seconds.
    cache_ttl: float
    #: Words a goal may use for this command; the offline planner matches on them.
    keywords: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


HOUR, MINUTES_5, SECONDS_5 = 3600.0, 300.0, 5.0

ALLOWED_COMMANDS: tuple[AllowedCommand, ...] = (
    AllowedCommand(
        ("uname", "-a"), HOUR, ("operating system", "os", "kernel", "system", "platform")
    ),
    AllowedCommand(("uname", "-s"), HOUR, ("os name", "kernel name")),
    AllowedCommand(("uname", "-r"), HOUR, ("kernel version", "kernel release")),
    AllowedCommand(
        ("df", "-h"),
        MINUTES_5,
        ("disk", "disk usage", "disk space", "storage", "filesystem", "free space"),
    ),
    AllowedCommand(("uptime",), SECONDS_5, ("uptime", "load", "load average", "running")),
    AllowedCommand(("nproc",), HOUR, ("cpu", "cpus", "cores", "processors")),
    AllowedCommand(("free", "-h"), SECONDS_5, ("memory", "ram")),
    AllowedCommand(("hostname",), HOUR, ("hostname", "host name", "machine name")),
    AllowedCommand(("date", "-u"), SECONDS_5, ("date", "time", "clock")),
    AllowedCommand(("whoami",), HOUR, ("user", "username", "current user")),
)

_BY_ARGV = {c.argv: c for c in ALLOWED_COMMANDS}

#: ``launcher(*argv, **kwargs)`` starts a process; ``asyncio.create_subprocess_exec``.
Launcher = Callable[..., Awaitable[asyncio.subprocess.Process]]


def describe_commands(commands: tuple[AllowedCommand, ...] = ALLOWED_COMMANDS) -> str:
    """One line per command, ``- `df -h`: disk, storage``: the planner parses this form."""
    return "\n".join(f"- `{c.text}`: {', '.join(c.keywords)}" for c in commands)


def _rejected(reason: str, message: str) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason=reason,
        violations=[FieldViolation("args.command", message)],
        metadata={"tool": "run_command"},
    )


def parse_command(command: str) -> AllowedCommand:
    """The allow-listed command ``command`` names, or ``InvalidArgument`` saying why not."""
    found = sorted({ch for ch in command if ch in SHELL_SYNTAX})
    if found:
        shown = " ".join(repr(ch) for ch in found)
        raise _rejected("SHELL_SYNTAX_REJECTED", f"shell syntax is not allowed: {shown}")
    try:
        argv = tuple(shlex.split(command))
    except ValueError as error:  # unbalanced quotes
        raise _rejected("SHELL_SYNTAX_REJECTED", f"cannot split command: {error}") from error
    allowed = _BY_ARGV.get(argv)
    if allowed is None:
        names = ", ".join(c.text for c in ALLOWED_COMMANDS)
        raise _rejected("COMMAND_NOT_ALLOWED", f"command is not allowed; allowed: {names}")
    return allowed


async def _read_capped(stream: asyncio.StreamReader | None, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of ``stream``; the rest is read and dropped so the child
    never blocks on a full pipe. Returns the bytes and whether any were dropped."""
    if stream is None:
        return b"", False
    kept = bytearray()
    truncated = False
    while chunk := await stream.read(_READ_CHUNK):
        room = limit - len(kept)
        if len(chunk) > room:
            truncated = True
            chunk = chunk[: max(room, 0)]
        kept += chunk
    return bytes(kept), truncated


class CommandTool(Tool):
    """Runs allow-listed commands; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        max_output_bytes: int = 64 * 1024,
        launcher: Launcher | None = None,
    ) -> None:
        self._timeout = timeout
        self._max_output_bytes = max_output_bytes
        self._launch: Launcher = launcher or asyncio.create_subprocess_exec
        self.spec = Spec(
            name="run_command",
            description=(
                "Run one read-only system command and return its output. The command must "
                "be exactly one of these (no shell syntax, no other arguments):\n"
                + describe_commands()
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "command": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 256,
                        "examples": [c.text for c in ALLOWED_COMMANDS],
                        "description": 'One allowed command, e.g. "df -h".',
                    }
                },
                "required": ["command"],
                "additionalProperties": False,
            },
            output_schema={
                "type": "object",
                "properties": {
                    "command": {"type": "string"},
                    "exit_code": {"type": "integer"},
                    "stdout": {"type": "string"},
                    "stderr": {"type": "string"},
                    "truncated": {"type": "boolean"},
                },
                "required": ["command", "exit_code", "stdout", "stderr", "truncated"],
                "additionalProperties": False,
            },
            cache_ttl=max(c.cache_ttl for c in ALLOWED_COMMANDS),
            # A little above the command's own limit so the tool kills the process and
            # reports it before the invoker's bound fires.
            timeout=timeout + 1.0,
        )

    def cache_ttl_for(self, args: dict[str, Json]) -> float:
        try:
            return parse_command(args["command"]).cache_ttl
        except (InvalidArgument, KeyError, TypeError):
            return 0.0  # the run will reject it; nothing to cache

    async def run(self, args: dict[str, Json]) -> Json:
        allowed = parse_command(args["command"])
        try:
            process = await self._launch(
                *allowed.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(COMMAND_ENV),
            )
        except OSError as error:  # not installed on this host, not executable
            raise ToolError(
                "COMMAND_UNAVAILABLE", f"cannot start {allowed.text}: {error.strerror or error}"
            ) from error
        try:
            async with asyncio.timeout(self._timeout):
                (stdout, out_cut), (stderr, err_cut), exit_code = await asyncio.gather(
                    _read_capped(process.stdout, self._max_output_bytes),
                    _read_capped(process.stderr, self._max_output_bytes),
                    process.wait(),
                )
        except TimeoutError:
            raise ToolError(
                "TOOL_TIMEOUT",
                f"{allowed.text} did not finish within {self._timeout:g}s and was killed",
                retryable=True,
            ) from None
        finally:
            # Timed out, or cancelled by the caller: never leave the child running.
            await _kill(process)
        return {
            "command": allowed.text,
            "exit_code": exit_code,
            "stdout": stdout.decode("utf-8", errors="replace"),
            "stderr": stderr.decode("utf-8", errors="replace"),
            "truncated": out_cut or err_cut,
        }


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    try:
        process.kill()
    except ProcessLookupError:
        pass
    await asyncio.shield(process.wait())
