"""The tools file -> a ``ToolRegistry``: parse, validate, build every tool, ask the sources.

Loading has two halves on purpose. Everything declared in the file (builtins, command
templates, HTTP, model and embed tools) is built synchronously and either entirely
succeeds or raises ``ToolsFileError`` naming the file and the place inside it
(``tools[3].commands[0].params.path.pattern: invalid regular expression ...``): a bad
file never becomes a half registry, and settings validation can run the same checks at
start-up. Tool *sources* (MCP servers, remote gRPC tool servers) are asked for their
tools afterwards, concurrently, and the load waits for their first answer only a bounded
time (``LoadOptions.source_timeout``): one that is slow or cannot be reached costs a
warning, not the load, because a remote outage must not block the rest of the gateway or
an unrelated edit of the file. Its ``SourceHandle`` keeps listing it in the background,
and its tools join the catalog when it answers (``trellis_toolgateway.sources``).

Paths in the file (``sandbox_root``, ``sql_database``) are relative to the file itself.

Every tool leaves the loader with a concrete output cap (``Spec.max_result_bytes``): its
own ``max_result_bytes`` (a source's applies to all of its tools), else the gateway's
default, never above what fits in a gRPC message (``LoadOptions``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from jsonschema import SchemaError
from pydantic import ValidationError

from trellis.runtime.channels import Channels
from trellis.runtime.logs import get_logger
from trellis_toolgateway.policy.retry import Backoff
from trellis_toolgateway.registry import SourceHandle, ToolRegistry, close_sources
from trellis_toolgateway.sources import SourceTimings
from trellis_toolgateway.tools.arithmetic import ArithmeticTool
from trellis_toolgateway.tools.base import (
    DEFAULT_MAX_RESULT_BYTES,
    MESSAGE_ENVELOPE_BYTES,
    Spec,
    Tool,
    ToolSource,
)
from trellis_toolgateway.tools.basic import EchoTool, SleepTool
from trellis_toolgateway.tools.command import CommandTool, Launcher, Template
from trellis_toolgateway.tools.config import (
    BuiltinTool,
    GrpcToolServer,
    McpServer,
    Policy,
    ToolDecl,
    ToolsFile,
)
from trellis_toolgateway.tools.config import CommandTool as CommandDecl
from trellis_toolgateway.tools.config import EmbedTool as EmbedDecl
from trellis_toolgateway.tools.config import HttpTool as HttpDecl
from trellis_toolgateway.tools.config import ModelTool as ModelDecl
from trellis_toolgateway.tools.embed import EmbedTool
from trellis_toolgateway.tools.files import ListDirTool, ReadFileTool
from trellis_toolgateway.tools.http import HttpTool, MissingSecret
from trellis_toolgateway.tools.model import ModelTool
from trellis_toolgateway.tools.model_calls import ModelAccess
from trellis_toolgateway.tools.sandbox import Sandbox
from trellis_toolgateway.tools.secrets import resolve
from trellis_toolgateway.tools.sql import SqlQueryTool

log = get_logger(__name__)

#: The default tools file, shipped inside the package: the builtins and ``run_command``.
BUNDLED_TOOLS_FILE = Path(__file__).with_name("tools.yaml")

#: pydantic's prefix on errors raised by our own validators; noise in a one-line message.
_VALUE_ERROR = "Value error, "
_KINDS = ("builtin", "command", "http", "model", "embed")


class ToolsFileError(Exception):
    """The tools file cannot be used; ``problems`` each name a place inside it."""

    def __init__(self, file: str | os.PathLike[str], problems: Sequence[str]) -> None:
        self.file = str(file)
        self.problems = [" ".join(p.split()) for p in problems]  # one line each
        super().__init__(f"{self.file}: {'; '.join(self.problems)}")


@dataclass(frozen=True)
class LoadOptions:
    """What building tools needs besides the file: service settings and shared handles."""

    #: Defaults for command tools that set no ``timeout`` / ``max_output_bytes`` of their own.
    command_timeout: float = 10.0
    command_max_output_bytes: int = 64 * 1024
    launcher: Launcher | None = None
    #: The gateway's one pooled client for HTTP tools (None: they fail with HTTP_UNAVAILABLE).
    http_client: httpx.AsyncClient | None = None
    #: Channels for remote gRPC tool servers (None: a file that declares one is rejected).
    channels: Channels | None = None
    #: Where ``${VAR}`` secrets are read (None: ``os.environ``).
    environ: Mapping[str, str] | None = None
    #: How long a load waits for a new source's first answer (a slower source's tools
    #: join later); also the bound of listing a connected source.
    source_timeout: float = 10.0
    #: Longest a source may take to start and answer (MCP ``initialize``).
    source_connect_timeout: float = 60.0
    #: Largest delay between attempts to list a source that does not answer.
    source_retry_max: float = 60.0
    #: Output cap of tools that set no ``max_result_bytes`` (TRELLIS_TOOL_MAX_RESULT_BYTES).
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    #: Largest gRPC message (TRELLIS_MAX_MESSAGE_BYTES): every cap stays below it.
    max_message_bytes: int = 4 * 1024 * 1024
    #: The planner, through which model and embed tools call models (None: they fail
    #: with MODEL_ACCESS_UNAVAILABLE).
    model_access: ModelAccess | None = None

    @property
    def source_timings(self) -> SourceTimings:
        return SourceTimings(
            connect=self.source_connect_timeout,
            list_wait=self.source_timeout,
            backoff=Backoff(initial=min(1.0, self.source_retry_max), maximum=self.source_retry_max),
        )

    def result_cap(self, declared: int | None) -> int:
        """The output cap of a tool that declares ``declared`` (None or 0: the default)."""
        ceiling = max(self.max_message_bytes - MESSAGE_ENVELOPE_BYTES, 1024)
        return min(declared or self.max_result_bytes, ceiling)


# -- parsing -----------------------------------------------------------------------------


def location(loc: Sequence[int | str]) -> str:
    """``('tools', 3, 'command', 'commands', 0, 'pattern')`` -> ``tools[3].commands[0].pattern``.

    The discriminator tag pydantic inserts after a tool's index is dropped: it is not a
    key anybody wrote in the file.
    """
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 2 and loc[0] == "tools" and part in _KINDS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _pydantic_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix(_VALUE_ERROR)
        problems.append(f"{location(item['loc'])}: {message}")
    return problems


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    return f"invalid YAML: {where}{problem}" + (f" ({context})" if context else "")


def parse_tools_file(text: str, file: str | os.PathLike[str]) -> ToolsFile:
    """``text`` as a ``ToolsFile`` or ``ToolsFileError`` (``file`` only names it)."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ToolsFileError(file, [_yaml_problem(error)]) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ToolsFileError(
            file, [f"(top level): expected a mapping with a tools list, got {got}"]
        )
    try:
        return ToolsFile.model_validate(data)
    except ValidationError as error:
        raise ToolsFileError(file, _pydantic_problems(error)) from None


def read_tools_file(path: str | os.PathLike[str]) -> ToolsFile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ToolsFileError(path, [f"cannot read the file: {error}"]) from None
    return parse_tools_file(text, path)


# -- declared tools ----------------------------------------------------------------------


def _policy_overrides(decl: Policy, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The policy fields the file sets explicitly (the rest keep the tool's defaults)."""
    overrides = {
        name: getattr(decl, name)
        for name in Policy.model_fields
        if name in decl.model_fields_set and name not in skip and getattr(decl, name) is not None
    }
    batch = overrides.pop("batch", None)
    if batch is not None:
        overrides.update(
            batch_max_items=batch.max_items,
            batch_max_wait=batch.max_wait_ms / 1000,
            batch_cost_nano_usd=batch.cost_nano_usd,
        )
    return overrides


#: Fields a tool's entry gives to its constructor: not applied again as overrides.
_OWN_CONTRACT = ("description", "input_schema", "output_schema", "timeout")


def _with_policy(tool: Tool, decl: Policy, skip: Sequence[str]) -> Tool:
    spec: Spec = dataclasses.replace(tool.spec, name=decl.name, **_policy_overrides(decl, skip))
    tool.spec = spec  # an instance attribute: builtins' class-level specs stay untouched
    return tool


@dataclass(frozen=True)
class _Where:
    """Resolved paths of one file."""

    file: Path
    sandbox: Sandbox
    sql_database: Path | None


def _where(tools_file: ToolsFile, file: Path) -> _Where:
    base = file.resolve().parent
    problems = []
    root = base / tools_file.sandbox_root
    if not root.is_dir():
        problems.append(f"sandbox_root: {root} is not a directory")
    database = None
    if tools_file.sql_database is not None:
        database = base / tools_file.sql_database
        if not database.is_file():
            problems.append(f"sql_database: {database} is not a file")
    if problems:
        raise ToolsFileError(file, problems)
    return _Where(file, Sandbox(root), database)


def _builtin(decl: BuiltinTool, where: _Where) -> Tool:
    set_fields = decl.model_fields_set
    if decl.builtin == "arithmetic":
        return _with_policy(ArithmeticTool(), decl, ())
    if decl.builtin == "sleep":
        return _with_policy(SleepTool(), decl, ())
    if decl.builtin == "echo":
        return _with_policy(EchoTool(), decl, ())
    if decl.builtin == "read_file":
        return _with_policy(ReadFileTool(where.sandbox, max_bytes=decl.max_bytes), decl, ())
    if decl.builtin == "list_dir":
        return _with_policy(ListDirTool(where.sandbox, max_entries=decl.max_items), decl, ())
    # sql_query: the file's timeout bounds the statement; the spec adds a margin over it.
    statement_timeout = decl.timeout if "timeout" in set_fields else 5.0
    tool = SqlQueryTool(
        where.sql_database, max_rows=decl.max_items, statement_timeout=statement_timeout
    )
    return _with_policy(tool, decl, ("timeout",))


def _command(decl: CommandDecl, where: _Where, options: LoadOptions) -> Tool:
    set_fields = decl.model_fields_set
    tool = CommandTool(
        [Template.from_config(t) for t in decl.commands],
        name=decl.name,
        description=decl.description,
        sandbox=where.sandbox,
        timeout=decl.timeout if "timeout" in set_fields else options.command_timeout,
        max_output_bytes=(
            decl.max_output_bytes
            if "max_output_bytes" in set_fields
            else options.command_max_output_bytes
        ),
        launcher=options.launcher,
    )
    # The description heads the generated command list and the timeout is the process's.
    return _with_policy(tool, decl, ("description", "timeout"))


def _http(decl: HttpDecl, index: int, where: _Where, options: LoadOptions) -> Tool:
    try:
        tool = HttpTool(decl, options.http_client, environ=options.environ)
    except MissingSecret as error:
        problem = f"tools[{index}].headers.{error.header}: {error}"
        raise ToolsFileError(where.file, [problem]) from None
    if "side_effects" not in decl.model_fields_set and decl.method != "GET":
        # Anything but GET may change the world: never cached unless the file says so.
        tool.spec = dataclasses.replace(tool.spec, side_effects=True)
    return _with_policy(tool, decl, _OWN_CONTRACT)


def _build(decl: ToolDecl, index: int, where: _Where, options: LoadOptions) -> Tool:
    tool: Tool
    if isinstance(decl, BuiltinTool):
        tool = _builtin(decl, where)
    elif isinstance(decl, CommandDecl):
        tool = _command(decl, where, options)
    elif isinstance(decl, ModelDecl):
        tool = _with_policy(ModelTool(decl, options.model_access), decl, _OWN_CONTRACT)
    elif isinstance(decl, EmbedDecl):
        tool = _with_policy(EmbedTool(decl, options.model_access), decl, _OWN_CONTRACT)
    else:
        tool = _http(decl, index, where, options)
    return _capped(tool, decl.max_result_bytes, options)


def _freshness_problem(decl: Policy, tool: Tool) -> str | None:
    """Why ``decl``'s cache freshness settings cannot apply to ``tool`` as built (its
    side effects may come from its kind: an HTTP POST has them unless the file says not)."""
    if decl.invalidates and not tool.spec.side_effects:
        return "invalidates: only a tool with side effects makes results stale"
    if decl.refresh_ahead and tool.spec.side_effects:
        return "refresh_ahead: a tool with side effects is never cached"
    return None


def _with_freshness(tool: Tool, config: Policy) -> Tool:
    """A source's ``refresh_ahead`` and ``invalidates`` on each of its tools (the first
    acts on its cacheable tools, the second on its side-effecting ones)."""
    given = {
        name: getattr(config, name)
        for name in ("refresh_ahead", "invalidates")
        if name in config.model_fields_set
    }
    if given:
        tool.spec = dataclasses.replace(tool.spec, **given)
    return tool


def _capped(tool: Tool, declared: int | None, options: LoadOptions) -> Tool:
    """``tool`` with its concrete output cap (see the module docstring)."""
    cap = options.result_cap(declared)
    if tool.spec.max_result_bytes != cap:
        tool.spec = dataclasses.replace(tool.spec, max_result_bytes=cap)
    return tool


def declared_tools(
    tools_file: ToolsFile, file: str | os.PathLike[str], options: LoadOptions
) -> ToolRegistry:
    """A registry of the file's declared tools (no sources), or ``ToolsFileError``."""
    where = _where(tools_file, Path(file))
    registry = ToolRegistry()
    for index, decl in enumerate(tools_file.tools):
        tool = _build(decl, index, where, options)
        if (problem := _freshness_problem(decl, tool)) is not None:
            raise ToolsFileError(file, [f"tools[{index}].{problem}"])
        try:
            registry.register(tool)
        except (ValueError, SchemaError) as error:
            message = error.message if isinstance(error, SchemaError) else str(error)
            raise ToolsFileError(file, [f"tools[{index}]: {message}"]) from None
    return registry


def declared_registry(path: str | os.PathLike[str], options: LoadOptions) -> ToolRegistry:
    """Read ``path`` and build its declared tools (sources are not contacted)."""
    return declared_tools(read_tools_file(path), path, options)


# -- sources -----------------------------------------------------------------------------


def _source_classes(tools_file: ToolsFile, file: str | os.PathLike[str]) -> dict[str, type]:
    """The source implementations the file needs, imported only then."""
    classes: dict[str, type] = {}
    problems = []
    if tools_file.mcp_servers:
        try:
            from trellis_toolgateway.tools.mcp_source import McpSource

            classes["mcp_servers"] = McpSource
        except ImportError as error:
            problems.append(f"mcp_servers: MCP tool sources are not available here ({error})")
    if tools_file.grpc_tool_servers:
        try:
            from trellis_toolgateway.tools.grpc_source import GrpcSource

            classes["grpc_tool_servers"] = GrpcSource
        except ImportError as error:
            problems.append(f"grpc_tool_servers: gRPC tool sources are not available ({error})")
    if problems:
        raise ToolsFileError(file, problems)
    return classes


def _missing_secrets(tools_file: ToolsFile, options: LoadOptions) -> list[str]:
    """``${VAR}`` references of MCP servers to variables that are not set."""
    problems = []
    for index, server in enumerate(tools_file.mcp_servers):
        for section in ("env", "headers"):
            try:
                resolve(getattr(server, section), options.environ)
            except MissingSecret as error:
                problems.append(f"mcp_servers[{index}].{section}.{error.key}: {error}")
    return problems


def check_tools_file(path: str | os.PathLike[str], options: LoadOptions | None = None) -> ToolsFile:
    """Everything that can be checked without contacting a source; ``ToolsFileError`` if bad."""
    options = options or LoadOptions()
    tools_file = read_tools_file(path)
    declared_tools(tools_file, path, options)
    _source_classes(tools_file, path)
    if problems := _missing_secrets(tools_file, options):
        raise ToolsFileError(path, problems)
    return tools_file


def _new_source(
    place: str,
    config: McpServer | GrpcToolServer,
    cls: type,
    where: _Where,
    options: LoadOptions,
) -> ToolSource:
    """A source for one entry; a constructor refusing the entry is a file error at ``place``."""
    try:
        if isinstance(config, McpServer):
            # Relative stdio commands and paths in them are relative to the file too.
            return cls(
                config,
                cwd=where.file.resolve().parent,
                connect_timeout=options.source_connect_timeout,
                environ=options.environ,
            )
        if options.channels is None:
            raise ValueError(f"no gRPC channels to reach {config.target}")
        return cls(config, options.channels.get(config.target))
    except MissingSecret as error:
        raise ToolsFileError(where.file, [f"{place}.{error.key}: {error}"]) from None
    except (ValueError, TypeError) as error:
        raise ToolsFileError(where.file, [f"{place}: {error}"]) from None


def _handle(
    key: object,
    source: ToolSource,
    config: McpServer | GrpcToolServer,
    options: LoadOptions,
) -> SourceHandle:
    """A handle listing ``source``; its tools get their output cap (a tool's own, else the
    entry's, else the gateway's)."""

    def prepare(tool: Tool) -> Tool:
        tool = _with_freshness(tool, config)
        return _capped(tool, tool.spec.max_result_bytes or config.max_result_bytes, options)

    return SourceHandle(
        key, source, name=config.name, prepare=prepare, timings=options.source_timings
    )


async def _add_sources(
    registry: ToolRegistry,
    tools_file: ToolsFile,
    where: _Where,
    options: LoadOptions,
    previous: ToolRegistry | None,
) -> None:
    entries: list[tuple[str, int, McpServer | GrpcToolServer]] = [
        *(("mcp_servers", i, c) for i, c in enumerate(tools_file.mcp_servers)),
        *(("grpc_tool_servers", i, c) for i, c in enumerate(tools_file.grpc_tool_servers)),
    ]
    if not entries:
        return
    classes = _source_classes(tools_file, where.file)
    reusable = list(previous.sources) if previous is not None else []
    new: list[SourceHandle] = []
    for section, index, config in entries:
        key = (section, config)
        handle = next((h for h in reusable if h.key == key), None)
        if handle is None:
            place = f"{section}[{index}]"
            source = _new_source(place, config, classes[section], where, options)
            handle = _handle(key, source, config, options)
            new.append(handle)
        else:
            reusable.remove(handle)  # the same server, still declared: keep its connection
        registry.sources.append(handle)
    for handle in new:
        handle.start()
    # Reused sources are current already; new ones get a bounded wait for a first answer.
    await asyncio.gather(*(h.first_listing(options.source_timeout) for h in new))
    for handle in new:
        if handle.listings == 0:
            log.warning(
                "tool source not listed yet; its tools join the catalog when it answers",
                source=handle.name,
                state=handle.state.value,
                error=handle.error,
            )


async def build_registry(
    tools_file: ToolsFile,
    file: str | os.PathLike[str],
    options: LoadOptions,
    *,
    previous: ToolRegistry | None = None,
) -> ToolRegistry:
    """The full registry of ``tools_file``: declared tools, then the sources' tools.

    Sources of ``previous`` whose entry is unchanged are reused (their connection or
    process survives the reload); the holder closes the ones no longer used.
    """
    registry = declared_tools(tools_file, file, options)
    registry.warm = list(tools_file.warm)
    try:
        await _add_sources(registry, tools_file, _where(tools_file, Path(file)), options, previous)
    except BaseException:
        kept = {id(h.source) for h in previous.sources} if previous is not None else set()
        await close_sources([h for h in registry.sources if id(h.source) not in kept])
        raise
    return registry.composed()
