"""Command tools (``run_command``): allow-listed command templates run with argv, never a shell.

The only way a string becomes a process here is a match against the tool's templates
(declared in the tools file, see ``config.CommandTemplate``):

1. the text is refused if it contains any shell syntax at all (so ``uname; id`` is an
   error, not ``uname`` plus a surprise) -> ``SHELL_SYNTAX_REJECTED``;
2. it is split with ``shlex`` (whitespace and quoting normalised) and compared with each
   template in order: same number of words, literal words equal, each placeholder word
   full-matching its parameter's regex (a value starting with ``-`` is an option, never a
   value, unless the parameter allows it) -> ``ARG_PATTERN_MISMATCH``; a path parameter
   must resolve inside the sandbox -> ``PATH_OUTSIDE_SANDBOX``; no template of that shape
   -> ``COMMAND_NOT_ALLOWED``.

The template's argv is started with ``create_subprocess_exec`` (no shell), the values
substituted (a path as its resolved real path), a minimal environment, no stdin, the
sandbox as working directory, a hard timeout (killed, not just abandoned) and bounded
output. The launcher is injectable so tests can prove rejected commands never start a
process.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from trellis.runtime.errors import FieldViolation, InvalidArgument, quote
from trellis_toolgateway.tools import config
from trellis_toolgateway.tools.base import Json, Spec, Tool, ToolError
from trellis_toolgateway.tools.config import PLACEHOLDER, PLACEHOLDERS, SHELL_SYNTAX
from trellis_toolgateway.tools.sandbox import Sandbox

__all__ = ["COMMAND_ENV", "SHELL_SYNTAX", "CommandTool", "Launcher", "Param", "Template"]

#: The whole environment of a command: a fixed PATH (not the service's own) and C locale.
COMMAND_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C"}

DEFAULT_HEADER = (
    "Run one read-only system command and return its output. The command must be exactly "
    "one of these (no shell syntax, no other arguments; a {placeholder} stands for one value):"
)

_READ_CHUNK = 64 * 1024

#: ``launcher(*argv, **kwargs)`` starts a process; ``asyncio.create_subprocess_exec``.
Launcher = Callable[..., Awaitable[asyncio.subprocess.Process]]


@dataclass(frozen=True)
class Param:
    """A placeholder's rule: full-match regex, optionally a sandboxed path."""

    name: str
    pattern: re.Pattern[str]
    path: bool = False
    allow_leading_dash: bool = False
    description: str = ""


@dataclass(frozen=True)
class Template:
    """One allowed command shape (compiled from ``config.CommandTemplate``)."""

    words: tuple[str, ...]
    argv: tuple[str, ...]
    params: Mapping[str, Param]
    #: Seconds a result stays fresh: a kernel version for an hour, the load for seconds.
    cache_ttl: float
    #: Words a goal may use for this command; the offline planner matches on them.
    keywords: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, decl: config.CommandTemplate) -> Template:
        params = {
            name: Param(name, re.compile(p.pattern), p.path, p.allow_leading_dash, p.description)
            for name, p in decl.params.items()
        }
        return cls(
            tuple(decl.words), tuple(decl.argv), params, decl.cache_ttl, tuple(decl.keywords)
        )

    @property
    def text(self) -> str:
        """How the planner sees it: ``df -h {path}``."""
        return " ".join(w if PLACEHOLDER.match(w) else shlex.quote(w) for w in self.words)

    def placeholder(self, word: str) -> Param | None:
        match = PLACEHOLDER.match(word)
        return self.params[match.group(1)] if match else None


@dataclass(frozen=True)
class Resolved:
    """A caller's command matched to a template: what runs and how it is reported."""

    template: Template
    argv: tuple[str, ...]
    #: The caller's command, normalised (``uname   -a`` -> ``uname -a``).
    text: str
    #: Each placeholder's value; a path as its real path.
    values: Mapping[str, str] = field(default_factory=dict)


def describe_commands(templates: Sequence[Template]) -> str:
    """One line per command, ``- `df -h`: disk, storage``: the planner parses this form.

    Placeholders are explained after the list on lines that do not start with ``-``, so a
    line-based parser sees only the commands.
    """
    lines = [f"- `{t.text}`: {', '.join(t.keywords)}" for t in templates]
    notes = {
        name: param for t in templates for name, param in t.params.items() if param.description
    }
    for name, param in notes.items():
        lines.append(f"{{{name}}} is {param.description}")
    return "\n".join(lines)


class CommandTool(Tool):
    """Runs allow-listed command templates; see the module docstring for the rules."""

    def __init__(
        self,
        templates: Sequence[Template],
        *,
        name: str = "run_command",
        description: str | None = None,
        sandbox: Sandbox | None = None,
        timeout: float = 10.0,
        max_output_bytes: int = 64 * 1024,
        launcher: Launcher | None = None,
    ) -> None:
        if not templates:
            raise ValueError("a command tool needs at least one command")
        if sandbox is None and any(p.path for t in templates for p in t.params.values()):
            raise ValueError("path parameters need a sandbox")
        self.templates = tuple(templates)
        self._sandbox = sandbox
        self._timeout = timeout
        self._max_output_bytes = max_output_bytes
        self._launch: Launcher = launcher or asyncio.create_subprocess_exec
        self.spec = Spec(
            name=name,
            description=(description or DEFAULT_HEADER) + "\n" + describe_commands(templates),
            input_schema={
                "type": "object",
                "properties": {
                    "command": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 256,
                        "examples": [t.text for t in templates],
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
            cache_ttl=max(t.cache_ttl for t in templates),
            # A little above the command's own limit so the tool kills the process and
            # reports it before the invoker's bound fires.
            timeout=timeout + 1.0,
        )

    def _rejected(self, reason: str, message: str) -> InvalidArgument:
        return InvalidArgument(
            message,
            reason=reason,
            violations=[FieldViolation("args.command", message)],
            metadata={"tool": self.spec.name},
        )

    def parse(self, command: str) -> Resolved:
        """The template ``command`` matches and the argv to run, or ``InvalidArgument``."""
        found = sorted({ch for ch in command if ch in SHELL_SYNTAX})
        if found:
            shown = " ".join(repr(ch) for ch in found)
            raise self._rejected("SHELL_SYNTAX_REJECTED", f"shell syntax is not allowed: {shown}")
        try:
            words = tuple(shlex.split(command))
        except ValueError as error:  # unbalanced quotes
            raise self._rejected(
                "SHELL_SYNTAX_REJECTED", f"cannot split command: {error}"
            ) from error
        first_problem: InvalidArgument | None = None
        for template in self.templates:
            if len(template.words) != len(words):
                continue
            literals_match = all(
                template.placeholder(t) is not None or t == w
                for t, w in zip(template.words, words, strict=True)
            )
            if not literals_match:
                continue
            try:
                return self._resolve(template, words)
            except InvalidArgument as problem:
                first_problem = first_problem or problem
        if first_problem is not None:
            raise first_problem
        names = ", ".join(t.text for t in self.templates)
        raise self._rejected("COMMAND_NOT_ALLOWED", f"command is not allowed; allowed: {names}")

    def _resolve(self, template: Template, words: tuple[str, ...]) -> Resolved:
        values: dict[str, str] = {}
        for word, value in zip(template.words, words, strict=True):
            param = template.placeholder(word)
            if param is None:
                continue
            if value.startswith("-") and not param.allow_leading_dash:
                raise self._rejected(
                    "ARG_PATTERN_MISMATCH",
                    f"{{{param.name}}} cannot start with '-' (options are not values):"
                    f" {quote(value)}",
                )
            if not param.pattern.fullmatch(value):
                raise self._rejected(
                    "ARG_PATTERN_MISMATCH",
                    f"{{{param.name}}} must match {param.pattern.pattern!r}, got {quote(value)}",
                )
            if param.path:
                assert self._sandbox is not None  # checked in __init__
                value = self._sandbox.resolve(value, field="args.command", tool=self.spec.name)
            values[param.name] = value
        argv = tuple(PLACEHOLDERS.sub(lambda m: values[m.group(1)], part) for part in template.argv)
        return Resolved(template, argv, shlex.join(words), values)

    def cache_ttl_for(self, args: dict[str, Json]) -> float:
        try:
            return min(self.parse(args["command"]).template.cache_ttl, self.spec.cache_ttl)
        except (InvalidArgument, KeyError, TypeError):
            return 0.0  # the run will reject it; nothing to cache

    def cache_args(self, args: dict[str, Json]) -> dict[str, Json]:
        """The normalised command and each placeholder by name (a path relative to the
        sandbox), so rules can name ``command`` or a placeholder such as ``path``."""
        try:
            resolved = self.parse(args["command"])
        except (InvalidArgument, KeyError, TypeError):
            return args
        sandbox, params = self._sandbox, resolved.template.params
        named: dict[str, Json] = {
            name: sandbox.relative(value) if sandbox is not None and params[name].path else value
            for name, value in resolved.values.items()
        }
        return {**named, "command": resolved.text}

    async def run(self, args: dict[str, Json]) -> Json:
        resolved = self.parse(args["command"])
        try:
            process = await self._launch(
                *resolved.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(COMMAND_ENV),
                cwd=self._sandbox.root if self._sandbox else None,
            )
        except OSError as error:  # not installed on this host, not executable
            raise ToolError(
                "COMMAND_UNAVAILABLE", f"cannot start {resolved.text}: {error.strerror or error}"
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
                f"{resolved.text} did not finish within {self._timeout:g}s and was killed",
                retryable=True,
            ) from None
        finally:
            # Timed out, or cancelled by the caller: never leave the child running.
            await _kill(process)
        return {
            "command": resolved.text,
            "exit_code": exit_code,
            "stdout": stdout.decode("utf-8", errors="replace"),
            "stderr": stderr.decode("utf-8", errors="replace"),
            "truncated": out_cut or err_cut,
        }


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


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    try:
        process.kill()
    except ProcessLookupError:
        pass
    await asyncio.shield(process.wait())
