"""A collector-like OTLP/gRPC trace receiver for the process benchmarks.

The services export spans to it exactly as to a real collector (``OTEL_EXPORTER_OTLP_ENDPOINT``,
the SDK's ``BatchSpanProcessor`` + ``OTLPSpanExporter``), so the cost of exporting is paid
where it is in a deployment. It serves opentelemetry-proto's ``TraceService.Export`` on a
``grpc.aio`` server, keeps the requests' bytes while the services are measured (a collector
would not share their two cores) and counts them afterwards: spans per trace, per name and
per service.

*Bookkeeping* spans are those of cost accounting's RPCs (``CheckBudget``, ``RecordUsage``,
``GetRunUsage``...: every method of ``trellis.costs.v1.CostAccountingService``) on the
client or the server side, and every span the cost-accounting process makes within them;
the issue's target is that they stay a small share of a run.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from trellis.costs.v1 import costs_pb2
from trellis_costs.service import NAME as COSTS_NAME

_COSTS_SERVICE = costs_pb2.DESCRIPTOR.services_by_name["CostAccountingService"]
#: ``package.Service/Method`` of every cost-accounting RPC.
BOOKKEEPING_RPCS = frozenset(f"{_COSTS_SERVICE.full_name}/{m.name}" for m in _COSTS_SERVICE.methods)
#: The OTLP trace service the exporters call (bytes in, bytes out here: see ``OtlpSink``).
_TRACE_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
#: ``service.name`` of the cost-accounting process (its service name, ``costs``).
COSTS_SERVICE_NAME = COSTS_NAME

#: A span as counted: (``service.name`` of the process that made it, span name).
SpanKey = tuple[str, str]


def is_bookkeeping(key: SpanKey) -> bool:
    """Whether a span is cost accounting's: one of its RPCs (with or without the leading
    slash the gRPC instrumentation puts in span names), or made by its process."""
    service, name = key
    return service == COSTS_SERVICE_NAME or name.lstrip("/") in BOOKKEEPING_RPCS


def _service_name(resource_spans: object) -> str:
    for attribute in resource_spans.resource.attributes:  # type: ignore[attr-defined]
        if attribute.key == "service.name":
            return attribute.value.string_value
    return ""


@dataclass
class SpanCounts:
    """What the sink has received, by trace (hex id) and in total."""

    by_trace: dict[str, Counter[SpanKey]] = field(default_factory=dict)
    by_name: Counter[str] = field(default_factory=Counter)
    by_service: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_service.values())

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        self.requests += 1
        for resource_spans in request.resource_spans:
            service = _service_name(resource_spans)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    trace = self.by_trace.setdefault(span.trace_id.hex(), Counter())
                    trace[service, span.name] += 1
                    self.by_name[span.name] += 1
                    self.by_service[service] += 1

    def of_traces(self, trace_ids: Iterable[str]) -> list[Counter[SpanKey]]:
        """The span names (with counts) of each of ``trace_ids`` (empty when none came)."""
        return [self.by_trace.get(trace_id, Counter()) for trace_id in trace_ids]


class OtlpSink:
    """``TraceService.Export``: keeps each request's bytes and answers success; the spans
    are counted when ``counts`` is read. Decoding is left for later so that the sink, which
    shares the machine with the services (a collector would not), takes as little CPU as
    it can while they are measured."""

    def __init__(self) -> None:
        self._counts = SpanCounts()
        self._received: list[bytes] = []

    def received(self, request: bytes) -> None:
        self._received.append(request)

    @property
    def counts(self) -> SpanCounts:
        """What the sink has received so far, decoded."""
        received, self._received = self._received, []
        for data in received:
            self._counts.add(trace_service_pb2.ExportTraceServiceRequest.FromString(data))
        return self._counts

    async def settle(self, trace_ids: Iterable[str], quiet: float, within: float) -> None:
        """Wait until every trace in ``trace_ids`` has spans and no span has arrived for
        ``quiet`` seconds (the exporters batch: a run's spans come over several exports),
        for at most ``within`` seconds."""
        wanted = list(trace_ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        last_total, last_change = -1, loop.time()
        while loop.time() < deadline:
            total = self.counts.total
            if total != last_total:
                last_total, last_change = total, loop.time()
            complete = all(self.counts.by_trace.get(t) for t in wanted)
            if complete and loop.time() - last_change >= quiet:
                return
            await asyncio.sleep(0.1)


@dataclass
class RunningSink:
    sink: OtlpSink
    server: aio.Server
    port: int

    @property
    def endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (with ``OTEL_EXPORTER_OTLP_INSECURE=true``)."""
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)


async def start_sink() -> RunningSink:
    """A sink on a free loopback port, serving on the running event loop."""
    sink = OtlpSink()
    server = aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])

    async def export(request: bytes, context: aio.ServicerContext) -> bytes:
        sink.received(request)
        return b""  # an empty ExportTraceServiceResponse: all accepted

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                _TRACE_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(export)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return RunningSink(sink, server, port)


def span_figures(traces: list[Counter[SpanKey]]) -> dict[str, object]:
    """Spans per run (median, min, max), the bookkeeping share over all their spans, and
    the mean count of each span (``service span-name``) per run."""
    sizes = sorted(sum(c.values()) for c in traces)
    total = sum(sizes)
    bookkeeping = sum(n for c in traces for key, n in c.items() if is_bookkeeping(key))
    names: Counter[SpanKey] = Counter()
    for c in traces:
        names.update(c)
    runs = len(traces)
    return {
        "runs": runs,
        "spans_per_run": sizes[len(sizes) // 2] if sizes else 0,
        "spans_per_run_min": sizes[0] if sizes else 0,
        "spans_per_run_max": sizes[-1] if sizes else 0,
        "bookkeeping_spans_per_run": round(bookkeeping / runs, 2) if runs else 0.0,
        "bookkeeping_span_share": round(bookkeeping / total, 4) if total else 0.0,
        "names_per_run": {
            f"{service} {name}": round(n / runs, 2)
            for (service, name), n in sorted(names.items(), key=lambda kv: -kv[1])
        },
    }
