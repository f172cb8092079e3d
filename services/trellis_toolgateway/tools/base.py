"""The ``Tool`` abstraction every backend implements: a spec and an async ``run``.

Builtins, and later YAML-registered shell/http/MCP/gRPC tools, all look the same to
the invoker: a ``Spec`` (the contract: JSON Schemas, caching, timeout) and
``run(args) -> output`` over plain JSON values. A tool that ran and failed raises
``ToolError`` (a FAILED outcome with a stable code); a call that broke the contract
raises ``trellis.runtime.errors.InvalidArgument`` (an RPC error). Nothing here knows
about gRPC; ``Spec.to_proto`` only builds the wire message.

A model tool's output comes ``Metered`` (with the tokens it spent, which its
``ToolError`` carries too); ``current_call()`` tells a tool whom the call is for. A
``BatchTool`` also takes several calls in one backend request (``run_batch``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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
    #: Concurrent calls sent to the backend together, up to this many (``batching``);
    #: 0 or 1: every call on its own. Only for tools that implement ``BatchTool``.
    batch_max_items: int = 0
    #: How long the first call of a batch waits for others to join it (seconds).
    batch_max_wait: float = 0.0
    #: What one backend request of several items costs (nano-USD); None: the items'
    #: ``cost_nano_usd`` each. Split exactly between the items it carried.
    batch_cost_nano_usd: int | None = None
    #: The tool calls a model through the planner (its outcomes carry model usage).
    calls_model: bool = False

    @property
    def batched(self) -> bool:
        return self.batch_max_items > 1

    def request_cost(self, items: int) -> int:
        """What one backend request carrying ``items`` calls costs (nano-USD)."""
        if items > 1 and self.batch_cost_nano_usd is not None:
            return self.batch_cost_nano_usd
        return self.cost_nano_usd * items

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
            batch_max_items=self.batch_max_items if self.batched else 0,
            calls_model=self.calls_model,
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
        usage: common_pb2.Usage | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.details = dict(details or {})
        #: Model tokens the failed call spent all the same (a model tool's).
        self.usage = usage


@dataclass(frozen=True)
class Metered:
    """A tool's output and the model tokens spent to produce it (a model tool's answer,
    with its cost as the ledger priced it): the node's ``NodeOutcome.usage``."""

    output: Json
    usage: common_pb2.Usage


@dataclass(frozen=True)
class CallInfo:
    """Whom a tool call is for: the run, node and idempotency key the caller gave, and
    which attempt of the call this is (1: the first; retries count up)."""

    run_id: str = ""
    node_id: str = ""
    idempotency_key: str = ""
    attempt: int = 1


#: Outside a call (a tool run by hand, a test).
NO_CALL = CallInfo()
_CALL: ContextVar[CallInfo] = ContextVar("trellis_tool_call", default=NO_CALL)


def current_call() -> CallInfo:
    """The call a tool's ``run`` is running for (set by the execution policy), so tools
    that pass ids on (usage ids, remote servers' idempotency keys) need no other argument."""
    return _CALL.get()


@contextmanager
def calling(call: CallInfo) -> Iterator[None]:
    token = _CALL.set(call)
    try:
        yield
    finally:
        _CALL.reset(token)


@dataclass(frozen=True)
class BatchItem:
    """One call of a batch: its arguments and whom it is for."""

    args: dict[str, Json]
    call: CallInfo


#: What a batch gives back for one item: an output (or a ``Metered`` one), or the
#: ``ToolError`` of that item alone.
ItemResult = Any


class Tool(ABC):
    """One tool. Subclasses set ``spec`` and implement ``run``."""

    spec: Spec

    @abstractmethod
    async def run(self, args: dict[str, Json]) -> Json:
        """The tool's output for ``args`` (already valid against ``spec.input_schema``)."""

    def cache_key_args(self, args: dict[str, Json]) -> Json:
        """What besides the tool's name and version decides its result, for the cache
        key: the arguments; a model tool adds its model and the rendered prompt."""
        return args

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


class BatchTool(Tool):
    """A tool whose backend takes several calls in one request (``batch:`` in the
    tools file); calls that arrive together are coalesced by ``batching``."""

    @abstractmethod
    async def run_batch(self, items: Sequence[BatchItem]) -> list[ItemResult]:
        """One result per item, in order (an output, ``Metered``, or a ``ToolError`` for
        that item); raise ``ToolError`` when the whole request failed."""


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
