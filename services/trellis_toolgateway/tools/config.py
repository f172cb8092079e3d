"""The tools file (``TRELLIS_TOOLS_FILE``, YAML) as typed models.

One file declares every tool the gateway serves: builtins (with their contract
overridable), command templates, HTTP tools, and the tool sources whose tools are
discovered at load time (MCP servers, remote gRPC tool servers). Validation errors
name the path inside the file, so a bad file is rejected with a clear message and the
last good registry stays in force.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Json = Any
_NAME = r"^[a-zA-Z][a-zA-Z0-9_.\-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Policy(_Strict):
    """Execution policy and contract knobs shared by every kind of tool."""

    description: str | None = None
    version: str = "1"
    input_schema: dict[str, Json] | None = None
    output_schema: dict[str, Json] | None = None
    side_effects: bool = False
    timeout: float = Field(10.0, gt=0, le=3600)
    cache_ttl: float = Field(0.0, ge=0)
    max_concurrency: int = Field(0, ge=0, description="0 = unbounded")
    cost_nano_usd: int = Field(0, ge=0)
    shared_cache: bool = False
    #: Extra attempts for retryable backend failures (exponential backoff with jitter).
    retries: int = Field(0, ge=0, le=10)


class BuiltinTool(Policy):
    kind: Literal["builtin"] = "builtin"
    name: str = Field(pattern=_NAME)
    #: Which implementation: arithmetic, run_command, read_file, list_dir, sql_query, sleep, echo.
    builtin: str


class CommandParam(_Strict):
    """One ``{placeholder}`` of a command template."""

    pattern: str = Field(description="Full-match regex the value must satisfy.")
    #: The value is a path that must resolve inside the sandbox root.
    path: bool = False
    description: str = ""


class CommandTemplate(_Strict):
    """An allow-listed command: argv with ``{placeholders}``, never a shell."""

    #: How callers write it, e.g. "df -h" or "git log -n {count}".
    command: str
    argv: list[str] = Field(min_length=1)
    params: dict[str, CommandParam] = {}
    cache_ttl: float = Field(0.0, ge=0)
    #: Words a planner may match a goal against (shown in the tool description).
    keywords: list[str] = []


class CommandTool(Policy):
    kind: Literal["command"] = "command"
    name: str = Field(pattern=_NAME)
    commands: list[CommandTemplate] = Field(min_length=1)
    max_output_bytes: int = Field(64 * 1024, ge=1, le=16 * 1024 * 1024)


class HttpTool(Policy):
    kind: Literal["http"] = "http"
    name: str = Field(pattern=_NAME)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    #: URL with ``{arg}`` placeholders filled from the (URL-encoded) arguments.
    url: str
    allowed_hosts: list[str] = Field(min_length=1)
    #: Header name -> template; ``${ENV_VAR}`` is read from the environment (secrets).
    headers: dict[str, str] = {}
    #: Arguments sent as the JSON body (POST/PUT/PATCH) or query string (GET/DELETE).
    body_args: list[str] = []
    max_response_bytes: int = Field(1024 * 1024, ge=1)


ToolDecl = Annotated[BuiltinTool | CommandTool | HttpTool, Field(discriminator="kind")]


class McpServer(Policy):
    """An MCP server whose tools are served as ``<prefix><tool>``."""

    name: str = Field(pattern=_NAME)
    #: stdio transport: the command (argv) that starts the server.
    command: list[str] | None = None
    env: dict[str, str] = {}
    #: streamable-HTTP transport: the server's URL.
    url: str | None = None
    prefix: str = ""

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of command (stdio) or url (streamable HTTP)")
        return self


class GrpcToolServer(Policy):
    """A server implementing ``trellis.tools.v1.ToolServerService``."""

    name: str = Field(pattern=_NAME)
    target: str
    prefix: str = ""


class ToolsFile(_Strict):
    version: Literal[1] = 1
    #: Root for read_file/list_dir and path parameters (relative to the file).
    sandbox_root: str = "."
    #: SQLite database for sql_query (opened read-only; relative to the file).
    sql_database: str | None = None
    tools: list[ToolDecl] = []
    mcp_servers: list[McpServer] = []
    grpc_tool_servers: list[GrpcToolServer] = []

    @model_validator(mode="after")
    def _unique_names(self) -> ToolsFile:
        names = [t.name for t in self.tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tool names must be unique: {', '.join(dupes)}")
        return self
