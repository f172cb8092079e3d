"""The gateway's core: one tool call in, one ``NodeOutcome`` out. No gRPC here.

For each call: find the tool (unknown -> ``NotFound``), check the arguments against
its input schema (-> ``InvalidArgument`` with one field violation per problem), serve
it from the result cache when the tool and the cache mode allow, otherwise run it
bounded by the tool's timeout and the caller's deadline, check the output against the
output schema, and store successful results. A tool that ran and failed is not an
exception but a FAILED outcome with a stable error code, so a plan can carry on.

The cache is fail-open: it exists to save time and money, so a cache that is down or
slow costs a warning, a metric and a span event, never the call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from jsonschema import ValidationError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, timestamp, to_value
from trellis.runtime.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    TrellisError,
)
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import CACHE_REQUESTS, TOOL_CALLS, TOOL_DURATION
from trellis_toolgateway.cache_keys import cache_key, cache_tags
from trellis_toolgateway.registry import Entry, ToolRegistry
from trellis_toolgateway.tools.base import Json, ToolError

log = get_logger(__name__)

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
CacheMode = common_pb2.CacheMode

_READS = (CacheMode.CACHE_MODE_UNSPECIFIED, CacheMode.CACHE_MODE_USE)
_WRITES = (*_READS, CacheMode.CACHE_MODE_REFRESH)


class ResultCache(Protocol):
    """What the invoker needs of a cache; ``trellis.clients.cache.CacheClient`` is one."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None: ...


@dataclass(frozen=True)
class Call:
    """One tool call as the core sees it (``ToolCall`` without the wire types)."""

    tool: str
    args: dict[str, Json] = field(default_factory=dict)
    node_id: str = ""

    @classmethod
    def from_proto(cls, call: common_pb2.ToolCall) -> Call:
        return cls(tool=call.tool, args=from_struct(call.args), node_id=call.node_id)


def _field(path: Sequence[str | int]) -> str:
    """``["items", 2, "name"]`` -> ``args.items[2].name`` (google.rpc BadRequest style)."""
    out = "args"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _violations(errors: Sequence[ValidationError]) -> list[FieldViolation]:
    """One violation per problem; a missing property is reported on the property itself."""
    violations: list[FieldViolation] = []
    seen: set[tuple[str, str]] = set()
    for error in errors:
        path = list(error.absolute_path)
        items = [(_field(path), error.message)]
        if error.validator == "required" and isinstance(error.instance, Mapping):
            items = [
                (_field([*path, name]), f"{name!r} is a required property")
                for name in error.validator_value
                if name not in error.instance
            ]
        for item in items:
            if item not in seen:
                seen.add(item)
                violations.append(FieldViolation(*item))
    return violations


def validate_args(entry: Entry, args: dict[str, Json]) -> None:
    """Raise ``InvalidArgument(ARGS_INVALID)`` unless ``args`` match the input schema."""
    errors = sorted(
        entry.args_validator.iter_errors(args), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        name = entry.tool.spec.name
        raise InvalidArgument(
            f"arguments of {name!r} do not match its input schema: {errors[0].message}",
            reason="ARGS_INVALID",
            violations=_violations(errors),
            metadata={"tool": name},
        )


def _failed(
    code: str, message: str, *, retryable: bool = False, details: Mapping[str, str] | None = None
) -> common_pb2.NodeOutcome:
    error = common_pb2.Error(code=code, message=message, retryable=retryable, details=details)
    return common_pb2.NodeOutcome(status=FAILED, error=error)


class Invoker:
    """Runs tool calls from ``registry`` with ``cache`` (None: no caching) and ``tracer``."""

    def __init__(
        self, registry: ToolRegistry, cache: ResultCache | None, tracer: trace.Tracer
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._tracer = tracer

    async def invoke(
        self,
        call: Call | common_pb2.ToolCall,
        *,
        run_id: str = "",
        idempotency_key: str = "",
        cache_mode: common_pb2.CacheMode.ValueType = CacheMode.CACHE_MODE_UNSPECIFIED,
    ) -> common_pb2.NodeOutcome:
        """The outcome of ``call``; contract violations raise ``NotFound``/``InvalidArgument``.

        ``idempotency_key`` is accepted for side-effecting tools (run once per key); no
        builtin has side effects, so nothing deduplicates on it yet.
        """
        if isinstance(call, common_pb2.ToolCall):
            call = Call.from_proto(call)
        entry = self._registry.get(call.tool)
        if entry is None:
            raise NotFound(
                f"unknown tool {call.tool!r}", reason="UNKNOWN_TOOL", metadata={"tool": call.tool}
            )
        spec, tenant = entry.tool.spec, context.tenant()
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": spec.name,
            "gen_ai.tool.call.id": call.node_id,
            "trellis.run_id": run_id,
            "trellis.node_id": call.node_id,
            "trellis.tenant_id": tenant,
        }
        with self._tracer.start_as_current_span(
            f"execute_tool {spec.name}", kind=SpanKind.INTERNAL, attributes=attributes
        ) as span:
            validate_args(entry, call.args)
            clock, started_at = time.perf_counter(), timestamp()

            ttl = min(entry.tool.cache_ttl_for(call.args), spec.cache_ttl) if spec.cacheable else 0
            use_cache = self._cache is not None and ttl > 0
            key = cache_key(tenant, spec.name, spec.version, call.args) if use_cache else ""
            cache_use, outcome, cache_ok = "bypass", None, True
            if use_cache and cache_mode in _READS:
                cache_use = "miss"
                outcome, cache_ok = await self._lookup(key, span)
                if outcome is not None:
                    cache_use = "hit"
            if outcome is None:
                outcome = await self._run(entry, call.args, span)
                # After a failed read, a write would most likely fail too and cost a second
                # cache timeout on this call; skip it.
                write = use_cache and cache_ok and cache_mode in _WRITES
                if outcome.status == SUCCEEDED and write:
                    await self._store(key, outcome.output, ttl, cache_tags(spec.name, tenant), span)

            outcome.node_id = call.node_id
            outcome.attempts = 1
            outcome.started_at.CopyFrom(started_at)
            outcome.finished_at.CopyFrom(timestamp())
            self._observe(spec.name, outcome, cache_use, time.perf_counter() - clock, span)
            return outcome

    async def _run(
        self, entry: Entry, args: dict[str, Json], span: trace.Span
    ) -> common_pb2.NodeOutcome:
        spec = entry.tool.spec
        bound = spec.timeout
        left = context.remaining()
        if left is not None:
            bound = min(bound, left)
        try:
            async with asyncio.timeout(max(bound, 0.0)):
                output = await entry.tool.run(args)
        except InvalidArgument:
            raise  # the call broke the tool's contract: an RPC error, not an outcome
        except TimeoutError:
            return _failed(
                "TOOL_TIMEOUT", f"{spec.name} did not finish within {bound:.3g}s", retryable=True
            )
        except ToolError as error:
            return _failed(
                error.code, error.message, retryable=error.retryable, details=error.details
            )
        except TrellisError as error:
            return _failed(error.reason, error.message, retryable=error.retryable)
        except Exception as error:  # a broken tool is a FAILED node, not a crash
            log.exception("tool raised", tool=spec.name)
            span.record_exception(error)
            return _failed("TOOL_FAILED", f"{spec.name} failed: {type(error).__name__}: {error}")
        problems = list(entry.output_validator.iter_errors(output))
        if problems:
            return _failed(
                "OUTPUT_INVALID",
                f"{spec.name} returned output that breaks its schema: {problems[0].message}",
            )
        try:
            value = to_value(output)
        except Exception as error:  # e.g. a non-JSON type from a tool
            return _failed("OUTPUT_INVALID", f"{spec.name} returned non-JSON output: {error}")
        return common_pb2.NodeOutcome(status=SUCCEEDED, output=value)

    async def _lookup(
        self, key: str, span: trace.Span
    ) -> tuple[common_pb2.NodeOutcome | None, bool]:
        """The cached outcome (None on a miss) and whether the cache answered at all."""
        assert self._cache is not None
        try:
            stored = await self._cache.get(key)
        except Exception as error:  # fail-open, see module docstring
            self._cache_failed("get", error, span)
            return None, False
        if stored is None:
            return None, True
        try:
            output = struct_pb2.Value.FromString(stored)
        except DecodeError as error:  # a bad entry: overwrite it with a fresh result
            self._cache_failed("decode", error, span)
            return None, True
        return common_pb2.NodeOutcome(status=SUCCEEDED, output=output, cache_hit=True), True

    async def _store(
        self, key: str, output: struct_pb2.Value, ttl: float, tags: list[str], span: trace.Span
    ) -> None:
        assert self._cache is not None
        try:
            await self._cache.set(key, output.SerializeToString(), ttl, tags)
        except Exception as error:  # fail-open
            self._cache_failed("set", error, span)

    @staticmethod
    def _cache_failed(operation: str, error: Exception, span: trace.Span) -> None:
        kind = error.reason if isinstance(error, TrellisError) else type(error).__name__
        log.warning(
            "cache failed; running without it", operation=operation, error=kind, message=str(error)
        )
        CACHE_REQUESTS.labels(result="error").inc()
        span.add_event(
            "trellis.cache.error",
            {"trellis.cache.operation": operation, "error.type": kind, "message": str(error)},
        )

    @staticmethod
    def _observe(
        tool: str,
        outcome: common_pb2.NodeOutcome,
        cache_use: str,
        seconds: float,
        span: trace.Span,
    ) -> None:
        succeeded = outcome.status == SUCCEEDED
        TOOL_CALLS.labels(
            tool=tool, outcome="succeeded" if succeeded else "failed", cache=cache_use
        ).inc()
        TOOL_DURATION.labels(tool=tool).observe(seconds)
        span.set_attribute("trellis.cache_hit", outcome.cache_hit)
        if not succeeded:
            span.set_attribute("error.type", outcome.error.code)
            span.set_status(Status(StatusCode.ERROR, outcome.error.message))
