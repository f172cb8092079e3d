"""One run = one trace: every service's spans share the run's trace id, parent to child.

The embedded stack (five services in one process, real gRPC) with an in-memory
exporter; ``test_trace_otlp`` checks the same over OTLP with five processes.
"""

import asyncio
import time
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.e2e.trace_edges import (
    EXPECTED_EDGES,
    MODEL_TOOL_EDGES,
    REDIS_EDGES,
    cross_edges,
    node_name,
)
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import to_struct
from trellis_cli.app import DEMO_GOAL
from trellis_cli.stack import start_stack


async def test_a_run_is_one_trace_across_all_five_services(tmp_path: Path, channels) -> None:
    exporter = InMemorySpanExporter()
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/t.db", span_processors=[SimpleSpanProcessor(exporter)]
    )
    try:
        client = ExecutorClient(channels.get(stack.executor_target))
        events = [e async for e in client.run(executor_pb2.RunRequest(goal=DEMO_GOAL))]
    finally:
        await stack.stop()
    trace_id = int(events[0].started.trace_id, 16)
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    service = {s.context.span_id: s.resource.attributes["service.name"] for s in spans}
    names = {s.name for s in spans}
    assert set(service.values()) == {"executor", "planner", "toolgateway", "cache", "costs"}
    assert {"trellis.run", "chat trellis-offline-rules-v1"} <= names
    assert sum(n.startswith("execute_tool run_command") for n in names) >= 1
    edges = cross_edges(
        (
            s.context.span_id,
            s.parent.span_id if s.parent else None,
            node_name(service[s.context.span_id], s.attributes),
        )
        for s in spans
    )
    # the embedded stack's cache is in memory, the demo uses no model tool: every edge
    # but those, and nothing else
    assert edges == EXPECTED_EDGES - REDIS_EDGES - MODEL_TOOL_EDGES
    # nothing of this run left the trace
    run_spans = [
        s
        for s in exporter.get_finished_spans()
        if s.attributes.get("trellis.run_id") == events[0].run_id
    ]
    assert run_spans and all(s.context.trace_id == trace_id for s in run_spans)
    # the run's plan format is on the run, the planner's RPCs and its model calls
    formats = {
        s.name: s.attributes["trellis.plan_format"]
        for s in spans
        if "trellis.plan_format" in s.attributes
    }
    assert formats == {
        "trellis.run": "jsonl",
        "/trellis.planner.v1.PlannerService/Plan": "jsonl",
        "/trellis.planner.v1.PlannerService/Join": "jsonl",
        "chat trellis-offline-rules-v1": "jsonl",
    }


class _Started(SpanProcessor):
    """``event`` is set once a span named ``name`` starts (an exporter sees only ends)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.event = asyncio.Event()

    def on_start(self, span, parent_context=None) -> None:  # type: ignore[no-untyped-def]
        if span.name == self.name:
            self.event.set()  # the embedded stack runs in this thread and loop


async def _finished(exporter: InMemorySpanExporter, name: str, within: float) -> ReadableSpan:
    deadline = time.monotonic() + within
    while not (found := [s for s in exporter.get_finished_spans() if s.name == name]):
        assert time.monotonic() < deadline, f"{name} did not end within {within:g}s"
        await asyncio.sleep(0.02)
    return found[0]


async def test_a_cancelled_run_ends_its_tool_call_and_every_span(tmp_path: Path, channels) -> None:
    """CancelRun mid tool call: the executor's InvokeTool client span ends (CANCELLED)
    and the call is cancelled on the gateway, instead of a span left open forever (an
    orphaned gateway subtree) and a 30 s sleep running on for nobody."""
    exporter, started = InMemorySpanExporter(), _Started("execute_tool sleep")
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/t.db",
        span_processors=[SimpleSpanProcessor(exporter), started],
    )
    try:
        client = ExecutorClient(channels.get(stack.executor_target))
        long = common_pb2.ToolCall(node_id="long", tool="sleep", args=to_struct({"ms": 30_000}))
        request = executor_pb2.RunRequest(run_id="cancel-me", plan=[long])
        events = []
        async for event in client.run(request):
            events.append(event)
            if event.WhichOneof("event") == "node_started":
                await asyncio.wait_for(started.event.wait(), 5)  # the gateway runs it
                await client.cancel_run("cancel-me")
        assert events[-1].finished.status == executor_pb2.RUN_STATUS_CANCELLED
        tool_span = await _finished(exporter, "execute_tool sleep", within=5)
        invoke = "/trellis.toolgateway.v1.ToolGatewayService/InvokeTool"
        await _finished(exporter, invoke, within=5)
    finally:
        await stack.stop()
    assert (tool_span.end_time - tool_span.start_time) / 1e9 < 5
    trace_id = int(events[0].started.trace_id, 16)
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    (client_span,) = [s for s in spans if s.name == invoke and s.kind == SpanKind.CLIENT]
    assert client_span.status.status_code == StatusCode.ERROR
    assert client_span.attributes["rpc.grpc.status_code"] == 1  # CANCELLED
    ids = {s.context.span_id for s in spans}
    assert all(s.parent is None or s.parent.span_id in ids for s in spans), "orphaned spans"
