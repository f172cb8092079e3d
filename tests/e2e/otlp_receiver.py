"""A minimal OTLP/gRPC trace receiver for tests: what services export, as plain records.

It implements opentelemetry-proto's ``TraceService`` (what Jaeger's or a collector's
port 4317 serves) on a free loopback port, so services started as separate processes
can be pointed at it with ``OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint`` and the
test reads back every span they exported, each with its resource's ``service.name``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SpanKind = trace_pb2.Span.SpanKind
StatusCode = trace_pb2.Status.StatusCode


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span; ids as lowercase hex (``parent_id`` is '' for a root)."""

    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    status: int
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def is_error(self) -> bool:
        return self.status == StatusCode.STATUS_CODE_ERROR


def _value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass
class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """``async with OtlpReceiver() as receiver:`` serves on ``receiver.endpoint``."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    _server: aio.Server | None = None
    _port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=service,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            attributes=_attributes(span.attributes),
                            status=span.status.code,
                            status_message=span.status.message,
                            resource=resource,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> OtlpReceiver:
        self._server = aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self._port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def __aenter__(self) -> OtlpReceiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
