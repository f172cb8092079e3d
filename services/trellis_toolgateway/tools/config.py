"""The tools file (``TRELLIS_TOOLS_FILE``, YAML) as typed models.

One file declares every tool the gateway serves: builtins (with their contract
overridable), command templates, HTTP tools, model and embed tools (calls of a model
through the planner), and the tool sources whose tools are discovered at load time
(MCP servers, remote gRPC tool servers). Tools whose backend takes several calls in one
request (HTTP, model, embed, gRPC tool servers) may declare ``batch``. Everything that can
be checked without running anything is checked here (regexes compile, JSON Schemas are
valid, placeholders are declared, builtins exist), so validation errors name the path
inside the file (``tools[3].commands[0].params.path.pattern: ...``), a bad file is
rejected with a clear message and the last good registry stays in force.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, SchemaError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from trellis.runtime.validation import TENANT_ID, TOOL_NAME

Json = Any
_NAME = r"^[a-zA-Z][a-zA-Z0-9_.\-]{0,63}$"

#: A whole word that is a placeholder: ``{path}``.
PLACEHOLDER = re.compile(r"^\{([a-zA-Z_][a-zA-Z0-9_]*)\}$")
#: Placeholders anywhere in a string (argv words such as ``--lines={n}``, URL templates).
PLACEHOLDERS = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")
#: ``${VAR}`` references to environment variables (secrets) in HTTP header templates.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Characters a shell gives meaning to; a command template may not contain them, since
#: a caller's command containing any of them is rejected before matching.
SHELL_SYNTAX = frozenset(";&|$`<>()\\\n\r\x00")

#: Implementations a ``kind: builtin`` entry may name.
BuiltinName = Literal["arithmetic", "read_file", "list_dir", "sql_query", "sleep", "echo"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def env_only_templates(
    values: dict[str, str], what: str, *, placeholders: bool = False
) -> dict[str, str]:
    """``values`` unchanged if their only substitutions are ``${ENV_VAR}`` references
    (secrets read from the environment at load); ValueError naming the bad one otherwise.
    ``placeholders``: a literal ``{word}`` is text (an environment value), not refused as
    an argument placeholder that would never be filled (a header)."""
    for name, value in values.items():
        rest = ENV_REFERENCE.sub("", value)
        if "${" in rest or (not placeholders and PLACEHOLDERS.search(rest)):
            raise ValueError(f"{what} {name!r}: only ${{ENV_VAR}} references are allowed")
    return values


def _tool_or_pattern(value: str) -> str:
    """A tool name, or a shell-style pattern over names (``files_*``)."""
    if not TOOL_NAME.pattern.fullmatch(value.replace("*", "x").replace("?", "x")):
        raise ValueError(f"not a tool name or pattern ({TOOL_NAME.rule}, * and ?): {value!r}")
    return value


ToolPattern = Annotated[str, AfterValidator(_tool_or_pattern)]


class Invalidation(_Strict):
    """Cached results a call of this tool makes stale (an ``invalidates:`` entry).

    Once a call of a side-effecting tool has reached its backend, the gateway drops the
    results of ``tools`` cached for the caller's tenant (the shared ones of a
    ``shared_cache`` tool) before it answers, narrowed by every condition given:
    ``args`` (their argument has this value), ``same_args`` (their argument equals this
    call's) and ``same_path`` (their path argument is this call's path, inside it, or
    one of its parent directories). A condition whose argument this call lacks is
    dropped: more results go, never fewer.
    """

    #: Tools whose results go: names or shell-style patterns (``files_*``).
    tools: list[ToolPattern] = Field(min_length=1)
    #: Their argument -> the value it must have, e.g. ``{command: "df -h"}``.
    args: dict[str, Json] = {}
    #: Their argument -> this call's argument whose value it must equal.
    same_args: dict[str, str] = {}
    #: Their path argument -> this call's path argument (one pair).
    same_path: dict[str, str] = Field({}, max_length=1)


def _tenant(value: str) -> str:
    if (problem := TENANT_ID.problem(value, required=True)) is not None:
        raise ValueError(f"tenant {problem}")
    return value


def _tool_name(value: str) -> str:
    if (problem := TOOL_NAME.problem(value, required=True)) is not None:
        raise ValueError(f"tool {problem}")
    return value


class WarmCall(_Strict):
    """A call the gateway makes at start and after each reload so first users hit."""

    tool: Annotated[str, AfterValidator(_tool_name)]
    args: dict[str, Json] = {}
    #: Tenants to warm it for; empty: every tenant, which only a ``shared_cache`` tool's
    #: one shared result can serve.
    tenants: list[Annotated[str, AfterValidator(_tenant)]] = []


class Batch(_Strict):
    """Concurrent calls of one tool sent to its backend as one request (``batching``)."""

    #: Most calls in one request.
    max_items: int = Field(ge=2, le=2048)
    #: How long the first call waits for others to join it.
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    #: What one request of several calls costs; unset: ``cost_nano_usd`` per call.
    cost_nano_usd: int | None = Field(None, ge=0)


#: The kinds of tool whose backend takes several calls in one request.
BATCHING_KINDS = "http, model and embed tools and gRPC tool servers"


class Policy(_Strict):
    """Execution policy and contract knobs shared by every kind of tool.

    For builtins and command tools only the fields the file sets override the
    implementation's defaults (``model_fields_set``); a builtin's schemas and
    description come from its code unless given here.
    """

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
    #: Largest output (serialized bytes) one call may return; more fails the call with
    #: OUTPUT_TOO_LARGE. Unset: the gateway's TRELLIS_TOOL_MAX_RESULT_BYTES. Never above
    #: what fits in a gRPC message (TRELLIS_MAX_MESSAGE_BYTES).
    max_result_bytes: int | None = Field(None, ge=1, le=256 * 1024 * 1024)
    #: Coalesce concurrent calls into one backend request (not every kind can).
    batch: Batch | None = None
    #: A cache hit on a result in this last part of its TTL (0.2: the last fifth) is
    #: answered at once and refreshed in the background; 0 = off.
    refresh_ahead: float = Field(0.0, ge=0, lt=1)
    #: Cached results a call of this (side-effecting) tool makes stale.
    invalidates: tuple[Invalidation, ...] = ()

    @model_validator(mode="after")
    def _freshness_fits_side_effects(self) -> Policy:
        if self.refresh_ahead and self.side_effects:
            raise ValueError("refresh_ahead: a tool with side effects is never cached")
        if self.invalidates and "side_effects" in self.model_fields_set and not self.side_effects:
            raise ValueError("invalidates: only a tool with side effects makes results stale")
        return self

    @field_validator("input_schema", "output_schema")
    @classmethod
    def _valid_json_schema(cls, schema: dict[str, Json] | None) -> dict[str, Json] | None:
        if schema is not None:
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as error:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                raise ValueError(f"not a valid JSON Schema at {where}: {error.message}") from None
        return schema

    def _unbatched(self, what: str) -> None:
        if self.batch is not None:
            raise ValueError(f"batch: {what} cannot take several calls at once ({BATCHING_KINDS})")


class BuiltinTool(Policy):
    kind: Literal["builtin"] = "builtin"
    name: str = Field(pattern=_NAME)
    #: Which implementation: arithmetic, read_file, list_dir, sql_query, sleep, echo.
    builtin: BuiltinName
    #: read_file: bytes returned at most (the rest is cut and ``truncated`` set).
    max_bytes: int = Field(1024 * 1024, ge=1, le=64 * 1024 * 1024)
    #: list_dir: entries returned at most; sql_query: rows returned at most.
    max_items: int = Field(1000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _no_batch(self) -> BuiltinTool:
        self._unbatched("a builtin")
        return self


class CommandParam(_Strict):
    """One ``{placeholder}`` of a command template."""

    pattern: str = Field(description="Full-match regex the value must satisfy.")
    #: The value is a path that must resolve inside the sandbox root.
    path: bool = False
    #: Values starting with ``-`` look like options and are refused unless this is set,
    #: whatever the pattern says (``--output=x`` must never reach a program as an option).
    allow_leading_dash: bool = False
    description: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"invalid regular expression {pattern!r}: {error}") from None
        return pattern


class CommandTemplate(_Strict):
    """An allow-listed command: argv with ``{placeholders}``, never a shell.

    ``command`` is what callers write and what the planner sees; a caller's text matches
    when it splits (shlex) into as many words, the literal words are equal and each
    placeholder word full-matches its parameter. ``argv`` is what runs, with the values
    substituted (path values as the resolved path): it may differ from ``command``, e.g.
    add ``--`` so that no value can ever be taken for an option.
    """

    #: How callers write it, e.g. "df -h" or "git log -n {count}".
    command: str
    argv: list[str] = Field(min_length=1)
    params: dict[str, CommandParam] = {}
    cache_ttl: float = Field(0.0, ge=0)
    #: Words a planner may match a goal against (shown in the tool description).
    keywords: list[str] = []

    @field_validator("command")
    @classmethod
    def _plain_words(cls, command: str) -> str:
        found = sorted({ch for ch in command if ch in SHELL_SYNTAX})
        if found:
            raise ValueError(f"shell syntax cannot be matched: {' '.join(map(repr, found))}")
        try:
            words = shlex.split(command)
        except ValueError as error:
            raise ValueError(f"cannot split {command!r}: {error}") from None
        if not words:
            raise ValueError("command is empty")
        if PLACEHOLDER.match(words[0]):
            raise ValueError("the program (first word) cannot be a placeholder")
        for word in words:
            if PLACEHOLDERS.search(word) and not PLACEHOLDER.match(word):
                raise ValueError(f"a placeholder must be a whole word: {word!r}")
        return command

    @field_validator("keywords")
    @classmethod
    def _keywords_fit_the_description(cls, keywords: list[str]) -> list[str]:
        for word in keywords:
            if not word.strip() or any(ch in word for ch in ",`\n"):
                raise ValueError(f"a keyword must be non-empty without , ` or newline: {word!r}")
        return keywords

    @property
    def words(self) -> list[str]:
        return shlex.split(self.command)

    @model_validator(mode="after")
    def _placeholders_declared(self) -> CommandTemplate:
        in_command = {m.group(1) for w in self.words if (m := PLACEHOLDER.match(w))}
        in_argv = {name for word in self.argv for name in PLACEHOLDERS.findall(word)}
        if PLACEHOLDERS.search(self.argv[0]):
            raise ValueError("argv[0] (the program) cannot contain a placeholder")
        if in_argv != in_command:
            raise ValueError(
                f"argv and command must use the same placeholders: argv {sorted(in_argv)}, "
                f"command {sorted(in_command)}"
            )
        if set(self.params) != in_command:
            raise ValueError(
                f"params must declare exactly the placeholders {sorted(in_command)}, "
                f"got {sorted(self.params)}"
            )
        return self


class CommandTool(Policy):
    kind: Literal["command"] = "command"
    name: str = Field(pattern=_NAME)
    commands: list[CommandTemplate] = Field(min_length=1)
    max_output_bytes: int = Field(64 * 1024, ge=1, le=16 * 1024 * 1024)

    @model_validator(mode="after")
    def _no_batch(self) -> CommandTool:
        self._unbatched("a command tool")
        return self

    @model_validator(mode="after")
    def _distinct_commands(self) -> CommandTool:
        seen: set[tuple[str, ...]] = set()
        for template in self.commands:
            words = tuple("{}" if PLACEHOLDER.match(w) else w for w in template.words)
            if words in seen:
                raise ValueError(f"command {template.command!r} is declared twice")
            seen.add(words)
        return self


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
    #: With ``batch``: where several calls are POSTed as ``{"items": [<args>, ...]}``,
    #: answered ``{"results": [<output or {"error": {...}}>, ...]}`` in the same order.
    #: Unset: ``url`` (which then has no placeholders).
    batch_url: str | None = None

    @field_validator("url", "batch_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/?#]+", url, re.IGNORECASE):
            raise ValueError(f"must be an absolute http:// or https:// URL, got {url!r}")
        return url

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_hosts(cls, hosts: list[str]) -> list[str]:
        return [h.strip().lower() for h in hosts]

    @field_validator("headers")
    @classmethod
    def _no_placeholders_in_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return env_only_templates(headers, "header")

    @property
    def url_params(self) -> list[str]:
        return list(dict.fromkeys(PLACEHOLDERS.findall(self.url)))

    @model_validator(mode="after")
    def _args_are_distinct(self) -> HttpTool:
        both = sorted(set(self.url_params) & set(self.body_args))
        if both:
            raise ValueError(f"arguments cannot be both in the URL and the body: {both}")
        return self

    @model_validator(mode="after")
    def _batch_endpoint(self) -> HttpTool:
        if self.batch_url is not None and PLACEHOLDERS.search(self.batch_url):
            raise ValueError("batch_url cannot have placeholders: each item's args go in the body")
        if self.batch is not None and self.batch_url is None and self.url_params:
            raise ValueError("batch needs a batch_url: url has placeholders for one call's args")
        if self.batch_url is not None:
            parts = urlsplit(self.batch_url)
            host = (parts.hostname or "").lower()
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
            if host not in self.allowed_hosts and f"{host}:{port}" not in self.allowed_hosts:
                raise ValueError(f"batch_url: host {host!r} is not in allowed_hosts")
        return self


class PromptMessage(_Strict):
    """One message of a model tool's prompt; ``{arg}`` placeholders take the arguments."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


_MODEL_NAME = r"^[\x21-\x7e]{1,128}$"


def _object_schema(schema: dict[str, Json] | None, kind: str) -> dict[str, Json]:
    if schema is None or schema.get("type") != "object":
        raise ValueError(f"input_schema: a {kind} tool needs an object schema of its arguments")
    return schema


class ModelTool(Policy):
    """A call of a model (through the planner) with a prompt made from the arguments."""

    kind: Literal["model"] = "model"
    name: str = Field(pattern=_NAME)
    #: Messages with ``{arg}`` placeholders (strings as they are, other values as JSON).
    prompt: list[PromptMessage] = Field(min_length=1)
    #: Unset: the planner's model (TRELLIS_MODEL).
    model: str | None = Field(None, pattern=_MODEL_NAME)
    max_output_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    timeout: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _prompt_fits_the_schema(self) -> ModelTool:
        schema = _object_schema(self.input_schema, "model")
        known = set(schema.get("properties", {}))
        used = {n for m in self.prompt for n in PLACEHOLDERS.findall(m.content)}
        unknown = sorted(used - known)
        if unknown:
            raise ValueError(f"prompt: placeholders not in input_schema.properties: {unknown}")
        return self

    @model_validator(mode="after")
    def _cached_only_if_deterministic(self) -> ModelTool:
        if self.cache_ttl > 0 and self.temperature != 0:
            raise ValueError(
                "cache_ttl: only a deterministic model tool is cached; set temperature: 0"
            )
        return self


#: The fixed contract of an embed tool.
EMBED_INPUT_SCHEMA: dict[str, Json] = {
    "type": "object",
    "properties": {
        "input": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2048},
            ],
            "description": "A text, or a list of texts, to embed.",
        }
    },
    "required": ["input"],
    "additionalProperties": False,
}
EMBED_OUTPUT_SCHEMA: dict[str, Json] = {
    "type": "object",
    "properties": {
        "vectors": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "model": {"type": "string"},
    },
    "required": ["vectors"],
}


class EmbedTool(Policy):
    """Texts to vectors with an embeddings model (through the planner)."""

    kind: Literal["embed"] = "embed"
    name: str = Field(pattern=_NAME)
    #: Unset: the planner's embedding model (TRELLIS_EMBEDDING_MODEL).
    model: str | None = Field(None, pattern=_MODEL_NAME)
    #: Length of the vectors, for models that can shorten them.
    dimensions: int | None = Field(None, ge=1, le=65536)
    timeout: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _fixed_contract(self) -> EmbedTool:
        if self.input_schema is not None or self.output_schema is not None:
            raise ValueError("an embed tool's schemas are fixed (input: text or texts)")
        return self


def _tool_kind(value: Json) -> str | None:
    """A tool's ``kind``; an entry without one is a builtin (the common case)."""
    if isinstance(value, dict):
        return str(value.get("kind", "builtin"))
    return getattr(value, "kind", None)


ToolDecl = Annotated[
    Annotated[BuiltinTool, Tag("builtin")]
    | Annotated[CommandTool, Tag("command")]
    | Annotated[HttpTool, Tag("http")]
    | Annotated[ModelTool, Tag("model")]
    | Annotated[EmbedTool, Tag("embed")],
    Discriminator(_tool_kind),
]


class McpToolPolicy(Policy):
    """Overrides for one tool of an MCP server (``mcp_servers[i].tools.<tool>``).

    Only the fields given apply, over what the server's annotations and entry decide
    (``trellis_toolgateway.tools.mcp_policy``). ``read_only``, ``destructive`` and
    ``idempotent`` replace the server's ``readOnlyHint``/``destructiveHint``/
    ``idempotentHint``; the contract (schemas) stays the server's.
    """

    read_only: bool | None = None
    destructive: bool | None = None
    idempotent: bool | None = None

    @model_validator(mode="after")
    def _contract_is_the_servers(self) -> McpToolPolicy:
        given = sorted({"input_schema", "output_schema"} & self.model_fields_set)
        if given:
            raise ValueError(f"{', '.join(given)}: an MCP tool's contract is its server's")
        return self


class McpServer(Policy):
    """An MCP server whose tools are served as ``<prefix><tool>``."""

    name: str = Field(pattern=_NAME)
    #: stdio transport: the command (argv) that starts the server.
    command: list[str] | None = Field(None, min_length=1)
    #: stdio: the server's environment (over a minimal one); ``${VAR}`` reads a secret.
    env: dict[str, str] = {}
    #: HTTP transports: the server's URL.
    url: str | None = None
    #: ``url`` servers: Streamable HTTP (default) or the legacy HTTP+SSE transport.
    transport: Literal["streamable_http", "sse"] = "streamable_http"
    #: ``url`` servers: headers sent with every request; ``${VAR}`` reads a secret.
    headers: dict[str, str] = {}
    prefix: str = ""
    #: Shell-style patterns of the server's tool names to serve (empty: all) ...
    include: list[str] = []
    #: ... and to leave out (applied after ``include``).
    exclude: list[str] = []
    #: Per-tool overrides, by the server's tool name (without the prefix).
    tools: dict[str, McpToolPolicy] = {}
    #: Serve the server's resources through a ``<prefix>read_resource`` tool.
    resources: bool = True

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of command (stdio) or url (streamable HTTP)")
        if self.url is not None:
            if not re.match(r"^https?://[^/?#]+", self.url, re.IGNORECASE):
                raise ValueError(f"url must be an absolute http:// or https:// URL: {self.url!r}")
            if self.env:
                raise ValueError("env is for stdio servers (command); send headers to a url")
        else:
            if self.headers:
                raise ValueError("headers are for url servers; give a stdio server env")
            if "transport" in self.model_fields_set:
                raise ValueError("transport is for url servers")
        self._unbatched("an MCP server")
        return self

    @field_validator("env")
    @classmethod
    def _env_references(cls, env: dict[str, str]) -> dict[str, str]:
        return env_only_templates(env, "env", placeholders=True)

    @field_validator("headers")
    @classmethod
    def _header_references(cls, headers: dict[str, str]) -> dict[str, str]:
        return env_only_templates(headers, "header")

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        if any(not p.strip() for p in patterns):
            raise ValueError("a pattern cannot be empty")
        return patterns


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
    #: Calls made at start and after each reload, so their results are cached.
    warm: list[WarmCall] = []

    @model_validator(mode="after")
    def _unique_names(self) -> ToolsFile:
        names = [t.name for t in self.tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tool names must be unique: {', '.join(dupes)}")
        sources = [s.name for s in [*self.mcp_servers, *self.grpc_tool_servers]]
        dupes = sorted({n for n in sources if sources.count(n) > 1})
        if dupes:
            raise ValueError(f"tool source names must be unique: {', '.join(dupes)}")
        return self
