"""One run = one trace: every service's spans share the run's trace id, parent to child."""

from pathlib import Path

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from trellis.cli.app import DEMO_GOAL
from trellis.cli.stack import start_stack
from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2

# (parent service, child service) edges a planned run must show, as gRPC client->server hops.
EXPECTED_EDGES = {
    ("executor", "toolgateway"),
    ("executor", "planner"),
    ("executor", "costs"),
    ("toolgateway", "cache"),
    ("planner", "costs"),
}


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
    edges = {
        (service[s.parent.span_id], service[s.context.span_id])
        for s in spans
        if s.parent is not None and s.parent.span_id in service
    }
    cross = {(a, b) for a, b in edges if a != b}
    assert EXPECTED_EDGES <= cross, EXPECTED_EDGES - cross
    # nothing of this run left the trace
    run_spans = [
        s
        for s in exporter.get_finished_spans()
        if s.attributes.get("trellis.run_id") == events[0].run_id
    ]
    assert run_spans and all(s.context.trace_id == trace_id for s in run_spans)
