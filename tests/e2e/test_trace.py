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
    MAX_BOOKKEEPING_SHARE,
    MODEL_TOOL_EDGES,
    REDIS_EDGES,
    bookkeeping_share,
    cross_edges,
    is_bookkeeping,
    node_name,
)
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import to_struct
from trellis_cli.app import DEMO_GOAL
from trellis_cli.stack import start_stack

INVOKE = "trellis.toolgateway.v1.ToolGatewayService/InvokeTool"
CHECK_BUDGET = "trellis.costs.v1.CostAccountingService/CheckBudget"


def _echo(node_id: str, depends_on: tuple[str, ...] = (), **args: object) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        node_id=node_id, tool="echo", args=to_struct(args), depends_on=list(depends_on)
    )


#: The bench's echo DAG: three roots, one node on two of them, one on that and the third.
ECHO_PLAN = [
    _echo("e1", value=1),
    _echo("e2", value=2),
    _echo("e3", value=3),
    _echo("e4", ("e1", "e2"), value="${e1}+${e2}"),
    _echo("e5", ("e3", "e4"), value="$e4"),
]


async def test_a_run_is_one_trace_across_the_services(tmp_path: Path, channels) -> None:
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
    # cost accounting's bookkeeping all succeeded: none of it is in the trace
    assert set(service.values()) == {"executor", "planner", "toolgateway", "cache"}
    assert not [s.name for s in spans if is_bookkeeping(s.name)]
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
        "trellis.planner.v1.PlannerService/Plan": "jsonl",
        "trellis.planner.v1.PlannerService/Join": "jsonl",
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
        invoke = INVOKE
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


def _of_trace(exporter: InMemorySpanExporter, events) -> list[ReadableSpan]:  # type: ignore[no-untyped-def]
    trace_id = int(events[0].started.trace_id, 16)
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


async def test_tool_calls_are_told_apart_and_the_run_span_has_its_totals(
    tmp_path: Path, channels
) -> None:
    """Each of the executor's InvokeTool client spans names its node and tool; the run's
    span carries what the run cost and did; no span of the run is bookkeeping."""
    exporter = InMemorySpanExporter()
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/t.db", span_processors=[SimpleSpanProcessor(exporter)]
    )
    try:
        client = ExecutorClient(channels.get(stack.executor_target))
        failing = common_pb2.ToolCall(
            node_id="zero", tool="arithmetic", args=to_struct({"expression": "1/0"})
        )
        after = _echo("after", ("zero",), value="$zero")
        echo = [e async for e in client.run(executor_pb2.RunRequest(plan=ECHO_PLAN))]
        mixed = [
            e async for e in client.run(executor_pb2.RunRequest(plan=[*ECHO_PLAN, failing, after]))
        ]
    finally:
        await stack.stop()
    spans = _of_trace(exporter, echo)
    invokes = [s for s in spans if s.name == INVOKE and s.kind == SpanKind.CLIENT]
    assert sorted(
        (s.attributes["trellis.node_id"], s.attributes["gen_ai.tool.name"]) for s in invokes
    ) == [(f"e{i}", "echo") for i in range(1, 6)]
    assert bookkeeping_share(s.name for s in spans) == 0 <= MAX_BOOKKEEPING_SHARE
    finished = echo[-1].finished
    (run_span,) = [s for s in spans if s.name == "trellis.run"]
    assert {k: v for k, v in run_span.attributes.items() if k.startswith("trellis.nodes.")} == {
        "trellis.nodes.total": 5,
        "trellis.nodes.succeeded": 5,
        "trellis.nodes.failed": 0,
        "trellis.nodes.skipped": 0,
        "trellis.nodes.cancelled": 0,
    }
    assert run_span.attributes["trellis.cost_nano_usd"] == finished.cost_nano_usd
    assert run_span.attributes["trellis.cache_hits"] == finished.cache_hits
    assert run_span.attributes["gen_ai.usage.input_tokens"] == 0  # an explicit plan: no model
    assert "session.id" not in run_span.attributes  # the run has no session

    (run_span,) = [s for s in _of_trace(exporter, mixed) if s.name == "trellis.run"]
    counts = {k: v for k, v in run_span.attributes.items() if k.startswith("trellis.nodes.")}
    assert counts == {
        "trellis.nodes.total": 7,
        "trellis.nodes.succeeded": 5,
        "trellis.nodes.failed": 1,
        "trellis.nodes.skipped": 1,
        "trellis.nodes.cancelled": 0,
    }
    assert run_span.attributes["trellis.cost_nano_usd"] == mixed[-1].finished.cost_nano_usd


async def test_a_planned_run_has_its_token_totals_on_the_run_span(tmp_path: Path, channels) -> None:
    exporter = InMemorySpanExporter()
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/t.db", span_processors=[SimpleSpanProcessor(exporter)]
    )
    try:
        client = ExecutorClient(channels.get(stack.executor_target))
        events = [e async for e in client.run(executor_pb2.RunRequest(goal=DEMO_GOAL))]
    finally:
        await stack.stop()
    finished = events[-1].finished
    spans = _of_trace(exporter, events)
    (run_span,) = [s for s in spans if s.name == "trellis.run"]
    assert finished.usage.input_tokens > 0 and finished.cost_nano_usd > 0
    assert run_span.attributes["gen_ai.usage.input_tokens"] == finished.usage.input_tokens
    assert run_span.attributes["gen_ai.usage.output_tokens"] == finished.usage.output_tokens
    assert run_span.attributes["trellis.cost_nano_usd"] == finished.cost_nano_usd
    assert bookkeeping_share(s.name for s in spans) <= MAX_BOOKKEEPING_SHARE


async def test_a_failed_budget_check_is_one_error_span_in_the_run(tmp_path: Path, channels) -> None:
    """Cost accounting down, the budget check fails open: the run goes ahead, and its
    trace shows the failed CheckBudget as one ERROR client span under the run."""
    exporter = InMemorySpanExporter()
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/t.db", span_processors=[SimpleSpanProcessor(exporter)]
    )
    try:
        # only its gRPC server: stopping the service would shut the shared span processor
        await stack.servers["costs"].server.stop(0)
        client = ExecutorClient(channels.get(stack.executor_target))
        events = [e async for e in client.run(executor_pb2.RunRequest(plan=ECHO_PLAN[:1]))]
    finally:
        await stack.stop()
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED  # failed open
    spans = _of_trace(exporter, events)
    checks = [s for s in spans if s.name == CHECK_BUDGET]
    (check,) = checks
    assert check.kind == SpanKind.CLIENT
    assert check.resource.attributes["service.name"] == "executor"
    assert check.status.status_code == StatusCode.ERROR
    assert check.attributes["rpc.grpc.status_code"] == 14  # UNAVAILABLE
    (run_span,) = [s for s in spans if s.name == "trellis.run"]
    assert check.parent is not None and check.parent.span_id == run_span.context.span_id


async def test_with_the_sdk_disabled_a_run_has_no_trace_id(
    tmp_path: Path, channels, monkeypatch
) -> None:
    """OTEL_SDK_DISABLED=true: the started event's trace_id is empty, not 32 zeros."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    stack = await start_stack(database_url=f"sqlite:///{tmp_path}/t.db")
    try:
        client = ExecutorClient(channels.get(stack.executor_target))
        events = [e async for e in client.run(executor_pb2.RunRequest(plan=ECHO_PLAN))]
        run = await client.get_run(events[0].run_id)
    finally:
        await stack.stop()
    assert events[0].started.trace_id == ""
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED
    assert run.trace_id == ""
