"""One run = one trace, as exported over OTLP by the five services as separate processes.

The test is the trace backend: an OTLP/gRPC receiver (``otlp_receiver``) on a free port
that every service exports to, configured only by the standard OTEL_* variables. The
cache runs on a real Redis so its command spans exist. After five runs for one tenant
(a planned run, the same goal again served from the cache, a run whose tool fails, a
run that fails on its deadline, a run of a model tool, whose model call the gateway makes
through the planner) the services are stopped with SIGTERM, which shuts
down their tracer providers and so flushes every batched span before they exit; then
each run's trace is checked: one trace id, one root, no orphans, the service edges of
``trace_edges``, and the attributes and statuses of the spans along the way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from grpc import aio

from tests.e2e.otlp_receiver import OtlpReceiver, ReceivedSpan, SpanKind
from tests.e2e.trace_edges import (
    EXPECTED_EDGES,
    MODEL_TOOL_EDGES,
    TOOL_RUN_EDGES,
    cross_edges,
    node_name,
)
from tests.support.tools_files import with_model_tools
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.context import TENANT_METADATA_KEY
from trellis.runtime.convert import to_struct
from trellis_cli.app import DEMO_GOAL

TENANT = "acme"
RUN_RPC = "/trellis.executor.v1.ExecutorService/Run"
CACHE_GET = "/trellis.cache.v1.CacheService/Get"
CHECK_BUDGET = "/trellis.costs.v1.CostAccountingService/CheckBudget"
RECORD_USAGE = "/trellis.costs.v1.CostAccountingService/RecordUsage"
#: The outboxes send usage in batches.
RECORD_USAGES = "/trellis.costs.v1.CostAccountingService/RecordUsages"
SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
SERVICES = {"executor", "planner", "toolgateway", "cache", "costs"}

Events = list[executor_pb2.RunResponse]


def _otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def _node(node_id: str, tool: str, **args: object) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args))


async def _run(stub: executor_pb2_grpc.ExecutorServiceStub, request) -> Events:
    """One run for ``TENANT``; the channel is not traced, so the executor starts the trace."""
    call = stub.Run(request, metadata=((TENANT_METADATA_KEY, TENANT),), timeout=60)
    return [event async for event in call]


def _of_kind(events: Events, kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


def _one(spans: Iterable[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


def _ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[str]:
    chain = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span.span_id)
    return chain


def _edges(trace: list[ReceivedSpan]) -> set[tuple[str, str]]:
    return cross_edges((s.span_id, s.parent_id, node_name(s.service, s.attributes)) for s in trace)


def _check_one_trace(spans: list[ReceivedSpan], events: Events) -> list[ReceivedSpan]:
    """The run's trace, after checking it is whole: its spans and only its spans."""
    run_id, trace_id = events[0].run_id, events[0].started.trace_id
    trace = [s for s in spans if s.trace_id == trace_id]
    carrying_run_id = {s.trace_id for s in spans if s.attributes.get("trellis.run_id") == run_id}
    assert carrying_run_id == {trace_id}, (
        "spans of the run in another trace",
        [(s.service, s.name) for s in spans if s.attributes.get("trellis.run_id") == run_id],
    )
    by_id = {s.span_id: s for s in trace}
    roots = [s for s in trace if not s.parent_id]
    assert [(s.service, s.name, s.kind) for s in roots] == [
        ("executor", RUN_RPC, SpanKind.SPAN_KIND_SERVER)
    ]
    orphans = [(s.service, s.name) for s in trace if s.parent_id and s.parent_id not in by_id]
    assert not orphans, f"spans whose parent never arrived: {orphans}"
    run_span = _one(trace, "executor", "trellis.run")
    assert run_span.parent_id == roots[0].span_id
    assert run_span.attributes["trellis.run_id"] == run_id
    assert run_span.attributes["trellis.tenant_id"] == TENANT
    elsewhere = [s for s in trace if s.service != "executor"]
    assert elsewhere and all(run_span.span_id in _ancestors(s, by_id) for s in elsewhere)
    servers = [s for s in trace if s.kind == SpanKind.SPAN_KIND_SERVER]
    assert {s.attributes.get("trellis.tenant_id") for s in servers} == {TENANT}
    return trace


def _check_tool_spans(trace: list[ReceivedSpan], events: Events) -> dict[str, ReceivedSpan]:
    """Each node's ``execute_tool`` span agrees with the node's outcome; by node id."""
    run_id = events[0].run_id
    planned = {n.call.node_id: n.call for n in _of_kind(events, "node_planned")}
    outcomes = {f.outcome.node_id: f.outcome for f in _of_kind(events, "node_finished")}
    tool_spans = {
        s.attributes["trellis.node_id"]: s for s in trace if s.name.startswith("execute_tool ")
    }
    assert set(tool_spans) == set(outcomes) and outcomes
    for node_id, span in tool_spans.items():
        outcome, tool = outcomes[node_id], planned[node_id].tool
        assert (span.service, span.name) == ("toolgateway", f"execute_tool {tool}")
        assert {k: span.attributes.get(k) for k in _TOOL_ATTRIBUTES} == {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool,
            "gen_ai.tool.call.id": node_id,
            "trellis.run_id": run_id,
            "trellis.node_id": node_id,
            "trellis.tenant_id": TENANT,
            "trellis.cache_hit": outcome.cache_hit,
        }
        assert span.is_error == (outcome.status != SUCCEEDED), (node_id, outcome)
    return tool_spans


_TOOL_ATTRIBUTES = (
    "gen_ai.operation.name",
    "gen_ai.tool.name",
    "gen_ai.tool.call.id",
    "trellis.run_id",
    "trellis.node_id",
    "trellis.tenant_id",
    "trellis.cache_hit",
)


async def test_each_run_is_one_trace_across_five_processes(
    process_stack, redis_server, tmp_path
) -> None:
    async with OtlpReceiver() as receiver:
        stack = await process_stack(
            env=_otel_env(receiver),
            per_service={
                "cache": {"TRELLIS_REDIS_URL": redis_server.url},
                "toolgateway": {"TRELLIS_TOOLS_FILE": str(with_model_tools(tmp_path))},
            },
        )
        async with aio.insecure_channel(stack.executor_target) as channel:
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            cold = await _run(stub, executor_pb2.RunRequest(goal=DEMO_GOAL))
            warm = await _run(stub, executor_pb2.RunRequest(goal=DEMO_GOAL))
            failing_tool = await _run(
                stub, executor_pb2.RunRequest(plan=[_node("zero", "arithmetic", expression="1/0")])
            )
            options = executor_pb2.RunOptions()
            options.timeout.FromMilliseconds(300)
            late = await _run(
                stub,
                executor_pb2.RunRequest(plan=[_node("nap", "sleep", ms=5000)], options=options),
            )
            model_tool = await _run(
                stub,
                executor_pb2.RunRequest(
                    plan=[_node("sum", "summarize", text="Disks fill up. Logs grow.")]
                ),
            )
        # Callers first; SIGTERM -> graceful stop -> tracer provider shut down -> spans
        # flushed to the receiver before the process exits. The receiver answers
        # meanwhile, so the blocking waits run in threads.
        for process in reversed(list(stack.processes.values())):
            await asyncio.to_thread(process.stop)
            assert process.process.returncode == 0, f"{process.name}:\n{process.output()}"
        spans = list(receiver.spans)

    runs = (cold, warm, failing_tool, late, model_tool)
    assert len({events[0].started.trace_id for events in runs}) == len(runs)
    traces = [_check_one_trace(spans, events) for events in runs]

    # A planned run crosses every service, over exactly the listed edges (all of them
    # but a tool's usage record when every tool call was a cache hit).
    for events, trace in zip(runs[:2], traces[:2], strict=True):
        ran = any(f.outcome.attempts > 0 for f in _of_kind(events, "node_finished"))
        expected = EXPECTED_EDGES - MODEL_TOOL_EDGES  # the demo uses no model tool
        assert _edges(trace) == (expected if ran else expected - TOOL_RUN_EDGES)
        assert {s.service for s in trace} == SERVICES
        costs_calls = {s.name for s in trace if s.service == "costs"}
        assert CHECK_BUDGET in costs_calls and {RECORD_USAGE, RECORD_USAGES} & costs_calls
    for trace in traces[2:]:  # explicit plans: no planner, nothing unlisted either
        assert _edges(trace) <= EXPECTED_EDGES

    # Model calls: GenAI client spans `chat {model}` with usage, for this run.
    cold_trace, warm_trace, failing_trace, late_trace, model_trace = traces
    chats = [s for s in cold_trace if s.name.startswith("chat ")]
    assert len(chats) >= 2  # the plan and the join
    for chat in chats:
        assert chat.service == "planner" and chat.kind == SpanKind.SPAN_KIND_CLIENT
        assert chat.name == f"chat {chat.attributes['gen_ai.request.model']}"
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.response.model"]
        assert chat.attributes["gen_ai.usage.input_tokens"] > 0
        assert chat.attributes["gen_ai.usage.output_tokens"] > 0
        assert chat.attributes["trellis.run_id"] == cold[0].run_id
        assert chat.attributes["trellis.tenant_id"] == TENANT

    # Cost accounting: each RecordUsage(s) writes its ledger rows inside a ledger span.
    ledger = [s for s in cold_trace if s.name == "trellis.ledger.record"]
    assert {s.service for s in ledger} == {"costs"}
    assert {s.attributes["trellis.usage.kind"] for s in ledger} == {"model", "tool"}
    assert all(s.attributes["trellis.tenant_id"] == TENANT for s in ledger)

    # Tool calls: one execute_tool span per node; the second run is served from the cache.
    _check_tool_spans(cold_trace, cold)
    warm_tools = _check_tool_spans(warm_trace, warm)
    assert warm[-1].finished.cache_hits >= 1
    assert any(s.attributes["trellis.cache_hit"] for s in warm_tools.values())
    hits = [s.attributes.get("trellis.cache_hit") for s in warm_trace if s.name == CACHE_GET]
    assert True in hits

    # Redis: command spans under the cache's RPCs; scripts loaded at start-up, so even
    # the first request's commands succeed at once (no NOSCRIPT error spans).
    by_id = {s.span_id: s for s in spans}
    redis_spans = [s for s in cold_trace if node_name(s.service, s.attributes) == "redis"]
    assert redis_spans
    for span in redis_spans:
        assert span.kind == SpanKind.SPAN_KIND_CLIENT and not span.is_error, span
        parent = by_id[span.parent_id]
        assert parent.service == "cache" and parent.kind == SpanKind.SPAN_KIND_SERVER

    # Errors: the failing tool's span is ERROR with the outcome's code, and the run (an
    # explicit plan whose node failed) ends FAILED naming it.
    (outcome,) = [f.outcome for f in _of_kind(failing_tool, "node_finished")]
    assert outcome.status == common_pb2.NODE_STATUS_FAILED
    zero = _check_tool_spans(failing_trace, failing_tool)["zero"]
    assert zero.is_error and zero.status_message == outcome.error.message
    assert zero.attributes["error.type"] == outcome.error.code
    run_span = _one(failing_trace, "executor", "trellis.run")
    assert run_span.is_error and run_span.attributes["trellis.run_status"] == "failed"
    assert run_span.status_message == failing_tool[-1].finished.error.message
    assert "node zero (arithmetic) failed" in run_span.status_message
    # ... and a run out of time has an ERROR run span saying why.
    finished = late[-1].finished
    assert (finished.status, finished.error.code) == (
        executor_pb2.RUN_STATUS_FAILED,
        "DEADLINE_EXCEEDED",
    )
    run_span = _one(late_trace, "executor", "trellis.run")
    assert run_span.is_error and run_span.status_message == finished.error.message
    assert run_span.attributes["trellis.run_status"] == "failed"
    (invoke,) = [s for s in late_trace if s.service == "executor" and s.name.endswith("InvokeTool")]
    assert invoke.is_error  # the call cut short by the deadline (cancelled or timed out)

    # A model tool's call: execute_tool in the gateway -> Generate in the planner -> its
    # chat span (GenAI attributes, for this node) -> the ledger, all in the run's trace.
    assert MODEL_TOOL_EDGES <= _edges(model_trace) <= EXPECTED_EDGES
    by_id = {s.span_id: s for s in model_trace}
    (chat,) = [s for s in model_trace if s.name.startswith("chat ")]
    assert chat.service == "planner" and chat.kind == SpanKind.SPAN_KIND_CLIENT
    assert chat.attributes["trellis.planner.step"] == "generate"
    assert (chat.attributes["trellis.tool"], chat.attributes["trellis.node_id"]) == (
        "summarize",
        "sum",
    )
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    tool_span = _check_tool_spans(model_trace, model_tool)["sum"]
    assert tool_span.span_id in _ancestors(chat, by_id)
    assert (
        model_tool[-1].finished.usage.input_tokens == chat.attributes["gen_ai.usage.input_tokens"]
    )
