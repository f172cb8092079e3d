"""The process benchmark's parts: the OTLP sink, and a tiny run of the real thing.

The tiny run starts the five services as processes (SQLite, and PostgreSQL + Redis), with
API keys and tracing exported over OTLP/gRPC to the sink, and checks that spans arrived
from the processes and that every figure the targets read is a number. No figure is held
to a speed here (the bench does that).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from bench import process_bench
from bench.otlp_sink import SpanCounts, is_bookkeeping, span_figures, start_sink
from bench.results import figure

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
COSTS = "trellis.costs.v1.CostAccountingService"


def export_request(service: str, names: list[str]) -> trace_service_pb2.ExportTraceServiceRequest:
    resource = resource_pb2.Resource(
        attributes=[
            common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))
        ]
    )
    spans = [
        trace_pb2.Span(trace_id=TRACE, span_id=bytes([i + 1]) * 8, name=n)
        for i, n in enumerate(names)
    ]
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource, scope_spans=[trace_pb2.ScopeSpans(spans=spans)]
            )
        ]
    )


def test_bookkeeping_is_cost_accounting_rpcs_and_the_costs_process_spans() -> None:
    assert is_bookkeeping(("executor", f"/{COSTS}/CheckBudget"))
    assert is_bookkeeping(("toolgateway", f"{COSTS}/RecordUsage"))
    assert is_bookkeeping(("costs", "trellis.ledger.record"))
    assert not is_bookkeeping(("executor", "trellis.toolgateway.v1.ToolGatewayService/Invoke"))
    assert not is_bookkeeping(("executor", "trellis.run"))


def test_counts_spans_per_trace_and_service() -> None:
    counts = SpanCounts()
    counts.add(
        export_request(
            "executor",
            ["trellis.run", f"/{COSTS}/CheckBudget"],
        )
    )
    counts.add(export_request("costs", ["trellis.ledger.record", "execute_tool echo"]))
    assert counts.requests == 2 and counts.total == 4
    assert counts.by_service == Counter({"executor": 2, "costs": 2})
    (trace,) = counts.of_traces([TRACE.hex()])
    assert trace[("costs", "trellis.ledger.record")] == 1
    figures = span_figures([trace])
    # CheckBudget's client span and everything the costs process made: 3 of 4
    assert figures["spans_per_run"] == 4
    assert figures["bookkeeping_span_share"] == 0.75
    assert counts.of_traces(["ff" * 16]) == [Counter()]


#: The figures the issue's targets read, per backend.
TARGET_FIGURES = (
    "skewed_dag.trellis_over_critical",
    "chain.overhead_per_node_ms",
    "fan_out.measured_ms",
    "throughput.nodes_per_s",
    "cpu_ms_per_node",
    "spans.spans_per_run",
    "spans.bookkeeping_span_share",
)


async def database_exists(name_prefix: str) -> bool:
    admin = await asyncpg.connect(process_bench.POSTGRES_ADMIN_URL, timeout=5)
    try:
        rows = await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"{name_prefix}%"
        )
    finally:
        await admin.close()
    return bool(rows)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", process_bench.BACKENDS)
async def test_tiny_process_bench_gets_spans_from_processes(backend: str, tmp_path: Path) -> None:
    sink = await start_sink()
    try:
        figures = await process_bench.measure_backend(
            backend, sink, process_bench.Workload.tiny(), tmp_path
        )
    finally:
        await sink.stop()

    counts = sink.sink.counts
    # real exports over OTLP/gRPC from the service processes, not from this one
    assert counts.requests > 0
    assert {"executor", "toolgateway"} <= set(counts.by_service)
    assert "costs" not in counts.by_service  # bookkeeping that succeeds makes no spans
    spans = figures["spans"]
    assert spans["runs"] == 1 and spans["spans_per_run"] >= 7  # the run and its six tool calls
    assert any(name.endswith(" trellis.run") for name in spans["names_per_run"])
    for name in TARGET_FIGURES:
        value = figure(figures, name)
        assert isinstance(value, int | float) and math.isfinite(value), (name, value)
    assert 0 <= spans["bookkeeping_span_share"] < 1
    assert figures["throughput"]["nodes"] == 2 * 2 * 5
    assert figures["cpu_ms_per_node"] > 0
    assert set(figures["throughput"]["cpu_ms_per_node_by_service"]) == {
        "cache",
        "costs",
        "toolgateway",
        "planner",
        "executor",
    }
    if backend == "postgres":  # the database made for the run is gone
        assert not await database_exists(f"trellis_bench_{os.getpid()}_")
