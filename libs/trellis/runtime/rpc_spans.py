"""RPC spans: what each gRPC method's client and server spans are called and carry.

Names follow the OpenTelemetry RPC conventions, ``package.Service/Method`` with no
leading slash, with ``rpc.system``, ``rpc.service``, ``rpc.method`` and
``rpc.grpc.status_code``; nothing else is worked out per call (no peer parsing, no
metadata copied), so a span costs what the SDK needs and no more.

Three kinds of method (``rpc_method`` decides, once per method name):

- traced: a client span and a server span per call, like any instrumentation;
- bookkeeping: a run's cost accounting (every ``CostAccountingService`` method but the
  ones a person calls: ``GetUsage``, ``SetBudget``). These made ~40 % of a run's spans
  and ~10 % of the services' CPU while telling a reader nothing, so they make no span
  unless they fail. The trace context still travels with the call, but the server runs
  the handler under an *unsampled* copy of it, so nothing it does (ledger spans,
  database or Redis commands) is recorded either. A failed call makes one span after
  the fact, from the call's start to its end with the error: the client's in the
  caller's trace, the server's only under a valid remote parent;
- untraced: health checks (probes would drown the traces).

The cache's ``Get``/``Set`` are not bookkeeping: they decide whether a tool runs and
carry the Redis command spans, so they are traced.

``call_attributes`` puts attributes on the client spans of the calls made inside it
(the executor's InvokeTool spans carry the node id and the tool's name that way).
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.propagate import extract
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.util.types import AttributeValue

#: The service whose run-time RPCs are bookkeeping.
BOOKKEEPING_SERVICE = "trellis.costs.v1.CostAccountingService"
#: Its methods a person calls (CLI, dashboards): traced like any RPC.
USER_FACING_METHODS = frozenset({"GetUsage", "SetBudget"})
_HEALTH_SERVICE = "grpc.health.v1.Health"

RPC_STATUS_CODE = "rpc.grpc.status_code"
_IDS = RandomIdGenerator()
_OK = grpc.StatusCode.OK.value[0]


class RpcKind(enum.Enum):
    TRACED = "traced"
    BOOKKEEPING = "bookkeeping"
    UNTRACED = "untraced"


@dataclass(frozen=True, slots=True)
class RpcMethod:
    """One gRPC method as its spans name it."""

    name: str  # ``package.Service/Method``
    kind: RpcKind
    attributes: Mapping[str, AttributeValue]


@functools.lru_cache(maxsize=4096)
def rpc_method(path: str | bytes) -> RpcMethod:
    """The method of a gRPC path (``/package.Service/Method``; grpc.aio client call
    details carry bytes, grpc#31092)."""
    if isinstance(path, bytes):
        path = path.decode()
    name = path.lstrip("/")
    service, _, method = name.partition("/")
    if service == _HEALTH_SERVICE:
        kind = RpcKind.UNTRACED
    elif service == BOOKKEEPING_SERVICE and method not in USER_FACING_METHODS:
        kind = RpcKind.BOOKKEEPING
    else:
        kind = RpcKind.TRACED
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
        RPC_STATUS_CODE: _OK,
    }
    return RpcMethod(name, kind, attributes)


_CALL_ATTRIBUTES: ContextVar[Mapping[str, AttributeValue] | None] = ContextVar(
    "trellis_rpc_call_attributes", default=None
)


@contextmanager
def call_attributes(attributes: Mapping[str, AttributeValue]) -> Iterator[None]:
    """Put ``attributes`` on the client span of every RPC started inside the block."""
    token = _CALL_ATTRIBUTES.set(attributes)
    try:
        yield
    finally:
        _CALL_ATTRIBUTES.reset(token)


def start_client_span(tracer: trace.Tracer, method: RpcMethod) -> trace.Span:
    """The client span of a traced call (not made current: it is injected explicitly)."""
    span = tracer.start_span(method.name, kind=SpanKind.CLIENT, attributes=method.attributes)
    extra = _CALL_ATTRIBUTES.get()
    if extra:
        span.set_attributes(extra)
    return span


def end_with_status(span: trace.Span, code: grpc.StatusCode, details: str | None) -> None:
    """Put the call's status on ``span`` and end it."""
    if code != grpc.StatusCode.OK:
        span.set_attribute(RPC_STATUS_CODE, code.value[0])
        span.set_status(trace.StatusCode.ERROR, f"{code.name}: {details or ''}".rstrip(": "))
    span.end()


def record_failure(
    tracer: trace.Tracer,
    method: RpcMethod,
    kind: SpanKind,
    start_ns: int,
    code: grpc.StatusCode,
    details: str | None,
    parent: Context | None = None,
) -> None:
    """The one span of a failed bookkeeping call, from ``start_ns`` until now."""
    span = tracer.start_span(
        method.name, context=parent, kind=kind, attributes=method.attributes, start_time=start_ns
    )
    if kind == SpanKind.CLIENT and (extra := _CALL_ATTRIBUTES.get()):
        span.set_attributes(extra)
    end_with_status(span, code, details)


def remote_context(metadata: object) -> Context | None:
    """The caller's trace context from a call's invocation metadata (None: none sent)."""
    if not metadata:
        return None
    return extract({item.key: item.value for item in metadata})  # type: ignore[attr-defined]


def unsampled(parent: Context | None) -> Context:
    """A context under which nothing is recorded (ParentBased sampling, the default):
    the parent's ids with the sampled flag off, or made-up ids when there is no parent."""
    parent_span = trace.get_current_span(parent).get_span_context() if parent else None
    if parent_span is not None and parent_span.is_valid:
        trace_id, span_id = parent_span.trace_id, parent_span.span_id
    else:
        trace_id, span_id = _random_ids()
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(0))
    return trace.set_span_in_context(NonRecordingSpan(context))


def has_remote_parent(parent: Context | None) -> bool:
    """Whether ``parent`` holds a valid, sampled span from the caller."""
    if parent is None:
        return False
    context = trace.get_current_span(parent).get_span_context()
    return context.is_valid and context.trace_flags.sampled


def _random_ids() -> tuple[int, int]:
    return _IDS.generate_trace_id(), _IDS.generate_span_id()


def now_ns() -> int:
    """The clock spans use for their start and end times."""
    return time.time_ns()


class ServerCall:
    """The server side of one call: its span (None for bookkeeping and untraced
    calls) and, once it fails, the status it fails with."""

    __slots__ = ("code", "details", "span")

    def __init__(self, span: trace.Span | None = None) -> None:
        self.span = span
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def failed(self, code: grpc.StatusCode, details: str) -> None:
        """The handler answers ``code`` (the interceptor's abort path calls this)."""
        self.code, self.details = code, details
        if self.span is not None:
            self.span.set_attribute(RPC_STATUS_CODE, code.value[0])
            self.span.set_status(trace.StatusCode.ERROR, f"{code.name}: {details}")


@contextmanager
def server_span(
    tracer: trace.Tracer | None, method: RpcMethod, metadata: object
) -> Iterator[ServerCall]:
    """The server span of one call, current while the handler runs (see the module's
    docstring for bookkeeping calls)."""
    if tracer is None or method.kind is RpcKind.UNTRACED:
        yield ServerCall()
        return
    parent = remote_context(metadata)
    if method.kind is RpcKind.BOOKKEEPING:
        start_ns, call = now_ns(), ServerCall()
        token = attach(unsampled(parent))
        try:
            yield call
        finally:
            detach(token)
            if call.code is not None and has_remote_parent(parent):
                record_failure(
                    tracer, method, SpanKind.SERVER, start_ns, call.code, call.details, parent
                )
        return
    span = tracer.start_span(
        method.name, context=parent, kind=SpanKind.SERVER, attributes=method.attributes
    )
    token = attach(trace.set_span_in_context(span, parent))
    try:
        yield ServerCall(span)
    finally:
        detach(token)
        span.end()
