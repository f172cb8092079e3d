"""The planner core against the real offline model (real openai client), fake recorder."""

import json
import time

import pytest
from openai import AsyncOpenAI
from opentelemetry.trace import SpanKind, StatusCode

from tests.support.model_script import script_of
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, to_struct, to_value
from trellis.runtime.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from trellis_planner.core import CallStarted, CallUsage, JoinEnd, PlanEnd, Planner, PlanStarted
from trellis_planner.model import ChatModel

DEMO = "Report this machine's OS, disk usage and uptime"
MODEL = "trellis-offline-rules-v1"


async def collect(stream) -> tuple[list, object]:
    """(nodes or answer pieces, the end item), without the per-call usage reports."""
    items = [
        item async for item in stream if not isinstance(item, CallStarted | CallUsage | PlanStarted)
    ]
    return items[:-1], items[-1]


def plan_request(goal: str, tools, **kwargs) -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(
        run_id=kwargs.pop("run_id", "run-1"), goal=goal, tools=tools, **kwargs
    )


def brief(calls) -> list[tuple[str, dict, list[str]]]:
    return [(c.tool, from_struct(c.args), list(c.depends_on)) for c in calls]


async def test_demo_goal_plans_three_commands_and_records_usage(planner, tools, recorder):
    nodes, end = await collect(planner.plan(plan_request(DEMO, tools)))
    assert brief(nodes) == [
        ("run_command", {"command": "uname -a"}, []),
        ("run_command", {"command": "df -h"}, []),
        ("run_command", {"command": "uptime"}, []),
    ]
    assert [n.node_id for n in nodes] == ["n1", "n2", "n3"]
    assert isinstance(end, PlanEnd)
    assert end.usage.model == MODEL
    assert end.usage.input_tokens > 0 and end.usage.output_tokens > 0
    assert end.usage.cost_nano_usd == 1234
    [recorded] = recorder.requests
    assert recorded.usage_id == "run-1/plan/0"
    assert recorded.run_id == "run-1"
    assert recorded.kind == costs_pb2.USAGE_KIND_MODEL
    assert (recorded.usage.input_tokens, recorded.usage.output_tokens) == (
        end.usage.input_tokens,
        end.usage.output_tokens,
    )
    assert not recorded.estimated and recorded.occurred_at.seconds > 0


async def test_prompt_carries_format_reference_rules_and_catalog(planner, tools, model):
    await collect(planner.plan(plan_request("What is 1+1?", tools, max_nodes=7)))
    [body] = model.requests
    assert body["model"] == MODEL and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    system, user = body["messages"]
    assert user == {"role": "user", "content": "What is 1+1?"}
    content = system["content"]
    assert "JSON Lines" in content and '"$n1"' in content and '"${n1.field.sub}"' in content
    assert "At most 7 lines" in content
    catalog = [json.loads(line) for line in content.split("## Tools\n")[1].splitlines()[1:]]
    assert [t["name"] for t in catalog] == ["run_command", "arithmetic", "sleep", "echo"]
    assert catalog[1]["input_schema"]["properties"] == {"expression": {"type": "string"}}


async def test_arithmetic_goal(planner, tools):
    nodes, _ = await collect(planner.plan(plan_request("What is (17*23)+4?", tools)))
    assert brief(nodes) == [("arithmetic", {"expression": "(17*23)+4"}, [])]


async def test_no_matching_tool_is_an_empty_plan(planner, tools):
    nodes, end = await collect(planner.plan(plan_request("Write me a poem", tools)))
    assert nodes == [] and isinstance(end, PlanEnd)


async def test_nodes_stream_before_the_model_has_finished(
    chat_model, recorder, tools, model, make_outbox
):
    model.state.delay_ms = 5
    outbox = await make_outbox(recorder.record_usage)
    planner = Planner(chat_model, outbox, default_model=MODEL, max_nodes=50)
    started = time.monotonic()
    arrivals = [time.monotonic() - started async for _ in planner.plan(plan_request(DEMO, tools))]
    assert arrivals[0] < 0.6 * arrivals[-1]


async def test_empty_goal_is_invalid(planner, tools):
    with pytest.raises(InvalidArgument) as raised:
        await collect(planner.plan(plan_request("  ", tools)))
    assert [v.field for v in raised.value.violations] == ["goal"]


async def test_unknown_tool_is_an_invalid_plan_and_usage_is_still_recorded(
    planner, tools, model, recorder
):
    script_of(model).reply(  # the repair call gets the same (still invalid) output
        '{"node_id": "n1", "tool": "echo", "args": {"value": 1}, "depends_on": []}\n'
        '{"node_id": "n2", "tool": "rm_rf", "args": {}, "depends_on": []}\n',
        times=2,
    )
    seen = []
    with pytest.raises(InvalidArgument) as raised:
        async for item in planner.plan(plan_request("anything", tools)):
            if not isinstance(item, CallStarted | CallUsage | PlanStarted):
                seen.append(item)
    assert [n.node_id for n in seen] == ["n1"]  # the valid first node went out at once
    assert raised.value.reason == "INVALID_PLAN"
    assert [v.field for v in raised.value.violations] == ["plan[1].tool"]
    assert "after one repair round" in raised.value.message
    assert [r.usage_id for r in recorder.requests] == ["run-1/plan/0", "run-1/plan-repair/0"]
    assert all(r.usage.output_tokens > 0 for r in recorder.requests)


async def test_prose_instead_of_json_names_the_line(planner, tools, model):
    script_of(model).reply(
        '```json\n{"node_id": "n1", "tool": "echo", "args": {"value": 1}}\nSure! Done.\n',
        times=2,
    )
    with pytest.raises(InvalidArgument) as raised:
        await collect(planner.plan(plan_request("anything", tools)))
    assert raised.value.reason == "INVALID_PLAN"
    assert "line 3" in raised.value.message
    assert [v.field for v in raised.value.violations] == ["plan"]


async def test_request_max_nodes_bounds_the_plan(planner, tools):
    with pytest.raises(InvalidArgument) as raised:
        await collect(planner.plan(plan_request(DEMO, tools, max_nodes=2)))
    assert "more than 2 nodes" in raised.value.message


async def test_recording_failure_still_finishes_with_zero_cost(planner, tools, recorder):
    recorder.fail = True
    nodes, end = await collect(planner.plan(plan_request(DEMO, tools)))
    assert len(nodes) == 3 and end.usage.cost_nano_usd == 0
    assert end.usage.input_tokens > 0


async def test_usage_id_is_a_uuid_outside_a_run(planner, tools, recorder):
    await collect(planner.plan(plan_request("What is 1+1?", tools, run_id="")))
    assert len(recorder.requests[0].usage_id) == 36


async def test_model_span_has_genai_attributes(planner, tools, spans):
    await collect(planner.plan(plan_request(DEMO, tools, run_id="run-9")))
    [span] = spans.get_finished_spans()
    assert span.name == f"chat {MODEL}" and span.kind == SpanKind.CLIENT
    attrs = dict(span.attributes)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == attrs["gen_ai.response.model"] == MODEL
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["trellis.run_id"] == "run-9"
    assert 0 < attrs["gen_ai.response.time_to_first_chunk"] < 5
    assert span.status.status_code != StatusCode.ERROR


# --- model failures -------------------------------------------------------------------


async def test_5xx_after_retries_is_model_unavailable(planner, tools, model, spans, recorder):
    script_of(model).fail(500, times=3, retry_after_ms=1)
    with pytest.raises(Unavailable) as raised:
        await collect(planner.plan(plan_request(DEMO, tools)))
    assert raised.value.reason == "MODEL_UNAVAILABLE"
    assert len(script_of(model)) == 0  # one call plus two retries
    [span] = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "MODEL_UNAVAILABLE"
    # nothing answered: the call's row has no tokens (it settles the call's reservation)
    [recorded] = recorder.requests
    assert recorded.usage_id == "run-1/plan/0" and not recorded.estimated
    assert (recorded.usage.input_tokens, recorded.usage.output_tokens) == (0, 0)


async def test_429_is_model_rate_limited(planner, tools, model):
    script_of(model).fail(429, times=3, retry_after_ms=1)
    with pytest.raises(ResourceExhausted) as raised:
        await collect(planner.plan(plan_request(DEMO, tools)))
    assert raised.value.reason == "MODEL_RATE_LIMITED"


async def test_unreachable_endpoint_is_model_unavailable(recorder, tools, spans, make_outbox):
    from opentelemetry.sdk.trace import TracerProvider

    client = AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0)
    chat = ChatModel(client, TracerProvider().get_tracer("t"), timeout=5)
    planner = Planner(
        chat, await make_outbox(recorder.record_usage), default_model=MODEL, max_nodes=50
    )
    try:
        with pytest.raises(Unavailable) as raised:
            await collect(planner.plan(plan_request(DEMO, tools)))
        assert raised.value.reason == "MODEL_UNAVAILABLE"
    finally:
        await chat.aclose()


async def test_slow_model_is_bounded_by_the_model_timeout(model, recorder, tools, make_outbox):
    from opentelemetry.sdk.trace import TracerProvider

    client = AsyncOpenAI(base_url=model.base_url, api_key="x", max_retries=2)
    chat = ChatModel(client, TracerProvider().get_tracer("t"), timeout=0.3)
    planner = Planner(
        chat, await make_outbox(recorder.record_usage), default_model=MODEL, max_nodes=50
    )
    script_of(model).stall(5.0, times=3)
    started = time.monotonic()
    try:
        with pytest.raises(DeadlineExceeded) as raised:
            await collect(planner.plan(plan_request(DEMO, tools)))
        assert raised.value.reason == "MODEL_TIMEOUT"
        assert time.monotonic() - started < 1.5  # retries do not stretch the bound
    finally:
        await chat.aclose()


async def test_slow_stream_is_bounded_by_the_request_deadline(planner, tools, model):
    model.state.delay_ms = 50
    started = time.monotonic()
    with context.request_scope(timeout=0.3), pytest.raises(DeadlineExceeded) as raised:
        await collect(planner.plan(plan_request(DEMO, tools)))
    # the caller's deadline, not the model's timeout: the caller's own DEADLINE_EXCEEDED
    assert raised.value.reason == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 1.0


# --- join -------------------------------------------------------------------------------


def join_request(**kwargs) -> planner_pb2.JoinRequest:
    plan = [
        common_pb2.ToolCall(
            node_id="n1", tool="run_command", args=to_struct({"command": "uptime"})
        ),
        common_pb2.ToolCall(
            node_id="n2", tool="arithmetic", args=to_struct({"expression": "(17*23)+4"})
        ),
    ]
    outcomes = [
        common_pb2.NodeOutcome(
            node_id="n1",
            status=common_pb2.NODE_STATUS_SUCCEEDED,
            output=to_value(
                {"stdout": " 10:00:00 up 3 days,  load average: 0.1\n", "exit_code": 0}
            ),
        ),
        common_pb2.NodeOutcome(
            node_id="n2",
            status=common_pb2.NODE_STATUS_FAILED,
            error=common_pb2.Error(code="TOOL_TIMEOUT", message="took too long"),
        ),
    ]
    return planner_pb2.JoinRequest(
        run_id="run-1",
        goal="How loaded is it?",
        plan=plan,
        outcomes=outcomes,
        round=1,
        **kwargs,
    )


async def test_join_streams_an_answer_and_finishes(planner, recorder):
    pieces, end = await collect(planner.join(join_request(allow_replan=True)))
    answer = "".join(pieces)
    assert len(pieces) > 3
    assert answer.splitlines() == [
        "Results for: How loaded is it?",
        "- `uptime`: 10:00:00 up 3 days, load average: 0.1",
        "- (17*23)+4 failed (TOOL_TIMEOUT: took too long)",
    ]
    assert isinstance(end, JoinEnd) and not end.replan and end.reason == ""
    assert end.usage.output_tokens > 0 and end.usage.cost_nano_usd == 1234
    assert recorder.requests[0].usage_id == "run-1/join/1"


async def test_join_replans_only_when_allowed(planner, model):
    script_of(model).reply("REPLAN: the load needs a second sample\n")
    pieces, end = await collect(planner.join(join_request(allow_replan=True)))
    assert pieces == []
    assert end.replan and end.reason == "the load needs a second sample"
    script_of(model).reply("REPLAN: again")
    pieces, end = await collect(planner.join(join_request(allow_replan=False)))
    assert "".join(pieces) == "REPLAN: again" and not end.replan


async def test_join_prompt_tells_the_model_about_replanning(planner, model):
    await collect(planner.join(join_request(allow_replan=False)))
    await collect(planner.join(join_request(allow_replan=True)))
    last_round, may_replan = (r["messages"][0]["content"] for r in model.requests)
    assert "REPLAN:" not in last_round and "last round" in last_round
    assert '"REPLAN: <what is missing>"' in may_replan
    goal, outcomes = (m["content"] for m in model.requests[0]["messages"][1:])
    assert goal == "How loaded is it?"
    outcome = json.loads(outcomes.split("## Outcomes\n")[1].splitlines()[1])
    assert outcome["tool"] == "run_command" and outcome["status"] == "SUCCEEDED"


async def test_replan_prompt_carries_the_previous_round(planner, tools, model):
    previous = [
        common_pb2.ToolCall(node_id="n1", tool="run_command", args=to_struct({"command": "uptime"}))
    ]
    outcomes = [common_pb2.NodeOutcome(node_id="n1", status=common_pb2.NODE_STATUS_FAILED)]
    request = plan_request(
        "What is 2+3?",
        tools,
        round=1,
        previous_plan=previous,
        previous_outcomes=outcomes,
        replan_reason="uptime failed",
    )
    nodes, _ = await collect(planner.plan(request))
    assert [n.node_id for n in nodes] == ["n2"]  # ids continue after the previous plan
    context_message = model.requests[0]["messages"][2]["content"]
    assert "## Previous plan" in context_message and "uptime failed" in context_message
    assert '"status": "FAILED"' in context_message


@pytest.mark.parametrize(
    ("goal", "run_id", "reason", "fields"),
    [
        ("x" * (32 * 1024 + 1), "run-1", "GOAL_TOO_LARGE", ["goal"]),
        ("What is 1+1?\x00", "run-1", "INVALID_GOAL", ["goal"]),
        ("What is 1+1?", "run/1", "INVALID_ID", ["run_id"]),
        ("   ", "r\x00", "GOAL_REQUIRED", ["goal", "run_id"]),
    ],
)
async def test_plan_and_join_requests_are_checked_before_the_model(
    planner, tools, model, goal: str, run_id: str, reason: str, fields: list[str]
) -> None:
    for stream in (
        planner.plan(plan_request(goal, tools, run_id=run_id)),
        planner.join(planner_pb2.JoinRequest(run_id=run_id, goal=goal)),
    ):
        with pytest.raises(InvalidArgument) as raised:
            await collect(stream)
        assert raised.value.reason == reason
        assert [v.field for v in raised.value.violations] == fields
    assert not model.requests
