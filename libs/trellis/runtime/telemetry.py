"""OpenTelemetry tracing configured only by the standard OTEL_* variables.

Each service gets its own TracerProvider, its resource read from
``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` by the SDK, ``service.name``
defaulting to the service's own name, so even the embedded stack, five services in one
process, shows five services in Jaeger. Spans are exported over OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_TRACES_EXPORTER``) says so; without it spans
are still made, so every run has a trace id (empty with ``OTEL_SDK_DISABLED=true``,
``trace_id_of``). gRPC client and server spans are made by the runtime's own
interceptors (``rpc_spans``: names, bookkeeping calls, health checks excluded).
``Telemetry.shutdown`` flushes every batched span: the server's stop path calls it, so
a SIGTERM loses none.

Attribute hygiene: every span processor (exporters included) is wrapped in
``RedactingSpanProcessor``, so what leaves the process has secrets redacted from span
names, attributes, events (recorded exceptions) and status descriptions
(``trellis.runtime.redact``). No instrumentation here records request metadata or
headers: the gRPC spans carry only the method and status, and the Redis instrumentation
writes ``db.statement`` as the command with every argument replaced by ``?`` (so cache
keys and values never reach a span). The openai client is not instrumented; the
planner's own ``chat`` spans carry model names and token counts, never prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from trellis.runtime.redact import redact_span

_global_set = False
#: Instrumentation scope of the RPC spans.
RPC_SCOPE = "trellis.rpc"


def _exporter_names() -> list[str]:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if names:
        return [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    endpoint_vars = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return ["otlp"] if any(os.environ.get(v) for v in endpoint_vars) else []


def _processors() -> list[SpanProcessor]:
    processors: list[SpanProcessor] = []
    for name in _exporter_names():
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r}")
    return processors


class RedactingSpanProcessor(SpanProcessor):
    """Hands ``inner`` (an exporting processor) a redacted copy of each ended span
    (the span itself when it holds no secret, the common case)."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context=parent_context)

    def _on_ending(self, span: Span) -> None:
        self.inner._on_ending(span)

    def on_end(self, span: ReadableSpan) -> None:
        self.inner.on_end(redact_span(span))

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


@dataclass
class Telemetry:
    """Tracing handles of one service."""

    service_name: str
    tracer_provider: TracerProvider
    extra_processors: list[SpanProcessor] = field(default_factory=list)

    @cached_property
    def tracer(self) -> trace.Tracer:
        """The service's own spans (``trellis.run``, ``execute_tool``, ``chat``...)."""
        return self.tracer_provider.get_tracer(f"trellis.{self.service_name}")

    @cached_property
    def rpc_tracer(self) -> trace.Tracer:
        """gRPC client and server spans (``trellis.runtime.rpc_spans``)."""
        return self.tracer_provider.get_tracer(RPC_SCOPE)

    def shutdown(self) -> None:
        """End tracing: export every span still batched (blocks up to the exporter's
        timeout), then refuse new ones. Idempotent."""
        self.tracer_provider.shutdown()


def service_resource(service_name: str) -> Resource:
    """The resource of a service's spans: ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME`` as the SDK reads them, ``service.name`` = the service's own
    name only when neither names one."""
    if OTELResourceDetector().detect().attributes.get(SERVICE_NAME):
        return Resource.create()
    return Resource.create({SERVICE_NAME: service_name})


def setup_telemetry(
    service_name: str, *, processors: list[SpanProcessor] | None = None
) -> Telemetry:
    """Tracing for ``service_name``; the first service in a process also becomes global.

    ``processors`` adds span processors (tests pass an in-memory exporter's); like the
    OTEL_* ones, each sees spans only through ``RedactingSpanProcessor``.
    """
    global _global_set
    provider = TracerProvider(resource=service_resource(service_name))
    for processor in [*_processors(), *(processors or [])]:
        provider.add_span_processor(RedactingSpanProcessor(processor))
    if not _global_set:
        trace.set_tracer_provider(provider)
        _global_set = True
    return Telemetry(service_name, provider)


def trace_id_of(span: trace.Span) -> str:
    """The span's trace id as 32 hex digits; empty when tracing is off
    (``OTEL_SDK_DISABLED=true``: the span is invalid, its id all zeros)."""
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def span_id_of(span: trace.Span) -> str:
    """The span's id as 16 hex digits; empty when tracing is off."""
    context = span.get_span_context()
    return format(context.span_id, "016x") if context.is_valid else ""


_REDIS_MARK = "_trellis_redis_instrumented"


def instrument_redis(telemetry: Telemetry, client: Any) -> None:
    """Trace every command of one Redis ``client`` with ``telemetry``'s tracer provider.

    Per client, not ``RedisInstrumentor().instrument()`` for the whole process: that
    patches the redis classes once with the *first* caller's provider, so in the embedded
    stack (one provider per service) and in tests (a fresh provider per server) spans
    would go to the wrong service or to a provider already shut down. Calling it twice on
    a client, or after global instrumentation (``opentelemetry-instrument``), does nothing,
    so commands are never traced twice. Command spans are children of the current span
    (the RPC being served), like any other client span.
    """
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    if getattr(client, _REDIS_MARK, False) or RedisInstrumentor().is_instrumented_by_opentelemetry:
        return
    RedisInstrumentor.instrument_client(client, tracer_provider=telemetry.tracer_provider)
    setattr(client, _REDIS_MARK, True)
