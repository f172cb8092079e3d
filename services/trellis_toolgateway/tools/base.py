"""The ``Tool`` abstraction every backend implements: a spec and an async ``run``.

Builtins, and later YAML-registered shell/http/MCP/gRPC tools, all look the same to
the invoker: a ``Spec`` (the contract: JSON Schemas, caching, timeout) and
``run(args) -> output`` over plain JSON values. A tool that ran and failed raises
``ToolError`` (a FAILED outcome with a stable code); a call that broke the contract
raises ``trellis.runtime.errors.InvalidArgument`` (an RPC error). Nothing here knows
about gRPC; ``Spec.to_proto`` only builds the wire message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import duration, to_struct
from trellis_toolgateway.tools.config import Invalidation

#: A JSON value as Python sees it (dict, list, str, int, float, bool, None).
Json = Any

#: Output cap of a tool whose spec sets none (TRELLIS_TOOL_MAX_RESULT_BYTES's default).
DEFAULT_MAX_RESULT_BYTES = 2 * 1024 * 1024
#: Room kept in a gRPC message for what surrounds an output (outcome, ids, times, error).
MESSAGE_ENVELOPE_BYTES = 16 * 1024


@dataclass(frozen=True)
class Spec:
    """What a tool is and the contract of its input and output (mirrors ``ToolSpec``)."""

    name: str
    description: str
    input_schema: Mapping[str, Json]
    output_schema: Mapping[str, Json]
    version: str = "1"
    side_effects: bool = False
    #: Longest time a result may be served from the cache; 0 disables caching.
    cache_ttl: float = 0.0
    #: Upper bound of one call; the caller's deadline may shorten it.
    timeout: float = 10.0
    #: Calls of this tool running at once (0 = unbounded); more wait in a bounded queue.
    max_concurrency: int = 0
    #: What one call costs, charged to the run (nano-USD).
    cost_nano_usd: int = 0
    #: Cache results across tenants (only for tools whose output is the same for all).
    shared_cache: bool = False
    #: Extra attempts after a retryable failure (ToolError(retryable=True), TOOL_TIMEOUT).
    retries: int = 0
    #: Largest output one call may return, serialized (bytes); beyond it the call fails
    #: with OUTPUT_TOO_LARGE. 0 = the gateway's default (``DEFAULT_MAX_RESULT_BYTES``
    #: for tools registered by hand; the loader fills in TRELLIS_TOOL_MAX_RESULT_BYTES).
    max_result_bytes: int = 0
    #: A cache hit on a result in this last part of its TTL is answered at once and
    #: refreshed in the background (0 = off; never for side-effecting tools).
    refresh_ahead: float = 0.0
    #: Cached results a call of this tool makes stale (side-effecting tools only).
    invalidates: tuple[Invalidation, ...] = ()

    @property
    def cacheable(self) -> bool:
        return not self.side_effects and self.cache_ttl > 0

    def to_proto(self) -> common_pb2.ToolSpec:
        return common_pb2.ToolSpec(
            name=self.name,
            description=self.description,
            version=self.version,
            input_schema=to_struct(dict(self.input_schema)),
            output_schema=to_struct(dict(self.output_schema)),
            side_effects=self.side_effects,
            cache_ttl=duration(self.cache_ttl),
            timeout=duration(self.timeout),
        )


class ToolError(Exception):
    """A tool ran and failed: becomes a FAILED outcome carrying ``code``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        details: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.details = dict(details or {})


class Tool(ABC):
    """One tool. Subclasses set ``spec`` and implement ``run``."""

    spec: Spec

    @abstractmethod
    async def run(self, args: dict[str, Json]) -> Json:
        """The tool's output for ``args`` (already valid against ``spec.input_schema``)."""

    def cache_ttl_for(self, args: dict[str, Json]) -> float:
        """How long the result for these ``args`` may be cached (0 = never).

        Defaults to the spec's TTL; a tool whose freshness depends on its arguments
        (``run_command``: ``uname`` for an hour, ``uptime`` for seconds) overrides it.
        Never above ``spec.cache_ttl``, which is what clients are told.
        """
        return self.spec.cache_ttl if self.spec.cacheable else 0.0

    def cache_args(self, args: dict[str, Json]) -> dict[str, Json]:
        """``args`` as cache tags and invalidation rules compare them: by name, each in
        its canonical form, so two spellings of one value match (``uname   -a`` and
        ``uname -a``; ``./notes/a.txt`` and ``notes/a.txt``). Defaults to ``args``; a
        tool whose arguments have such spellings overrides it, and never raises."""
        return args


@dataclass
class FunctionTool(Tool):
    """A tool from a spec and a coroutine function; handy for tests and small builtins."""

    spec: Spec
    fn: Callable[[dict[str, Json]], Awaitable[Json]] = field(repr=False)

    async def run(self, args: dict[str, Json]) -> Json:
        return await self.fn(args)


class ToolSource(ABC):
    """A backend that brings its own tools, discovered when the registry loads
    (an MCP server, a remote ``trellis.tools.v1.ToolServerService``)."""

    #: What kind of source it is, as ListTools shows it ("mcp", "grpc").
    kind: str = ""

    @abstractmethod
    async def tools(self) -> list[Tool]:
        """Connect if needed and return the tools this source offers now."""

    def watch(self, changed: Callable[[], None]) -> None:  # noqa: B027 - optional hook
        """Call ``changed`` whenever the tools may have changed or the backend went away,
        so the gateway lists them again. Sources that cannot tell do nothing."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release connections and processes; the registry calls it when replaced."""
