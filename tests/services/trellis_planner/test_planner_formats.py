"""The json_schema and tool_calls plan formats through the planner core: the real openai
client against the offline model (rules, or a scripted stream), a fake usage recorder.

Each node leaves the planner the moment its object or its call's arguments close in the
stream, before the model writes the next one (the order of the model's ``on_plan_node``
hook and the planner's items shows it). Every misbehaviour of a real model gets one
repair round or a clear error, and every call is in the ledger.
"""

from __future__ import annotations

import json

import pytest

from tests.support.model_script import script_of
from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import from_struct, to_struct, to_value
from trellis.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from trellis_planner.core import CallStarted, CallUsage, JoinEnd, PlanEnd, Planner, PlanStarted
from trellis_planner.formats import FormatChooser, PlanFormat

DEMO = "Report this machine's OS, disk usage and uptime"
MODEL = "trellis-offline-rules-v1"


@pytest.fixture
async def make_planner(chat_model, recorder, make_outbox):
    async def make(fmt: str) -> Planner:
        outbox = await make_outbox(recorder.record_usage)
        return Planner(
            chat_model,
            outbox,
            default_model=MODEL,
            max_nodes=50,
            max_line_bytes=4096,
            formats=FormatChooser(fmt),
        )

    return make


def request(goal: str, tools, **kwargs) -> planner_pb2.PlanRequest:
    kwargs.setdefault("run_id", "run-1")
    return planner_pb2.PlanRequest(goal=goal, tools=tools, **kwargs)


async def items(stream) -> list:
    return [item async for item in stream if not isinstance(item, CallStarted | CallUsage)]


def nodes_of(streamed: list) -> list[tuple[str, str, dict]]:
    return [
        (i.node_id, i.tool, from_struct(i.args))
        for i in streamed
        if isinstance(i, common_pb2.ToolCall)
    ]


DEMO_NODES = [
    ("n1", "run_command", {"command": "uname -a"}),
    ("n2", "run_command", {"command": "df -h"}),
    ("n3", "run_command", {"command": "uptime"}),
]


@pytest.mark.parametrize("fmt", ["json_schema", "tool_calls"])
async def test_each_node_leaves_before_the_model_writes_the_next(make_planner, tools, model, fmt):
    planner = await make_planner(fmt)
    order: list[str] = []
    model.state.line_delay_ms = 60
    model.state.on_plan_node = lambda index, text: order.append(f"emitted {index}")
    streamed = []
    async for item in planner.plan(request(DEMO, tools)):
        if isinstance(item, common_pb2.ToolCall):
            order.append(f"node {item.node_id}")
        streamed.append(item)
    assert order == [
        "emitted 0",
        "node n1",
        "emitted 1",
        "node n2",
        "emitted 2",
        "node n3",
    ]
    assert isinstance(streamed[0], PlanStarted) and streamed[0].plan_format == PlanFormat(fmt)
    assert nodes_of(streamed) == DEMO_NODES
    assert isinstance(streamed[-1], PlanEnd) and not streamed[-1].answered


async def test_json_schema_requests_carry_the_plan_schema(make_planner, tools, model):
    await items((await make_planner("json_schema")).plan(request(DEMO, tools)))
    [body] = model.requests
    response_format = body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    schema = response_format["json_schema"]["schema"]
    branches = schema["properties"]["nodes"]["items"]["anyOf"]
    assert [b["properties"]["tool"]["enum"][0] for b in branches] == [t.name for t in tools]
    assert 'one JSON object {"nodes": [...]}' in body["messages"][0]["content"]
    assert "tools" not in body


async def test_tool_calls_requests_carry_the_catalog_as_functions(make_planner, tools, model):
    await items((await make_planner("tool_calls")).plan(request(DEMO, tools)))
    [body] = model.requests
    assert [t["function"]["name"] for t in body["tools"]] == [t.name for t in tools]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"] == DEMO


async def test_tool_calls_a_model_that_answers_needs_no_join(make_planner, tools, recorder):
    planner = await make_planner("tool_calls")
    streamed = await items(planner.plan(request("Écris un haïku sur l'automne", tools)))
    text = "".join(i for i in streamed if isinstance(i, str))
    assert "No available tool matches this goal" in text and "- arithmetic:" in text
    end = streamed[-1]
    assert isinstance(end, PlanEnd) and end.answered
    assert [r.usage_id for r in recorder.requests] == ["run-1/plan/0"]


def outcome(node_id: str, output: object) -> common_pb2.NodeOutcome:
    return common_pb2.NodeOutcome(
        node_id=node_id, status=common_pb2.NODE_STATUS_SUCCEEDED, output=to_value(output)
    )


def call(node_id: str, tool: str, args: dict) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args))


def join_request(tools, goal: str, plan, outcomes, allow_replan: bool) -> planner_pb2.JoinRequest:
    return planner_pb2.JoinRequest(
        run_id="run-1",
        goal=goal,
        plan=plan,
        outcomes=outcomes,
        tools=tools,
        round=0,
        allow_replan=allow_replan,
        plan_format=common_pb2.PLAN_FORMAT_TOOL_CALLS,
    )


async def test_a_tool_calls_join_calls_the_next_round_or_answers(make_planner, tools, model):
    planner = await make_planner("jsonl")  # the run's format wins over the planner's
    goal = "compute 6*7 then echo the result"
    plan = [call("n1", "arithmetic", {"expression": "6*7"})]
    done = [outcome("n1", {"result": 42})]
    streamed = await items(planner.join(join_request(tools, goal, plan, done, True)))
    assert nodes_of(streamed) == [("n2", "echo", {"value": {"result": 42}})]
    end = streamed[-1]
    assert isinstance(end, JoinEnd) and end.replan and end.reason == "the model called 1 more tools"
    body = model.requests[-1]
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool"]
    assert body["messages"][2]["tool_calls"][0]["id"] == "n1"  # node ids are the call ids
    assert json.loads(body["messages"][3]["content"]) == {
        "status": "SUCCEEDED",
        "output": {"result": 42},
    }
    plan.append(call("n2", "echo", {"value": {"result": 42}}))
    done.append(outcome("n2", {"result": 42}))
    streamed = await items(planner.join(join_request(tools, goal, plan, done, False)))
    answer = "".join(i for i in streamed if isinstance(i, str))
    assert answer.splitlines()[1:] == ["- 6*7 = 42", '- echo {"value": {"result": 42}}: 42']
    assert not streamed[-1].replan
    assert model.requests[-1]["tool_choice"] == "none"
    assert "last round" in model.requests[-1]["messages"][0]["content"]


async def test_a_model_calling_tools_on_the_last_round_is_a_bad_response(
    make_planner, tools, model, recorder
):
    planner = await make_planner("tool_calls")
    script_of(model).tool_calls(("echo", '{"value": 1}'))
    plan, done = [call("n1", "echo", {"value": 0})], [outcome("n1", 0)]
    with pytest.raises(Unavailable) as raised:
        await items(planner.join(join_request(tools, "x", plan, done, False)))
    assert raised.value.reason == "MODEL_BAD_RESPONSE"
    assert [r.usage_id for r in recorder.requests] == ["run-1/join/0"]


# --- misbehaviour: tool_calls ---------------------------------------------------------------


async def test_bad_arguments_and_an_unknown_function_get_one_repair(
    make_planner, tools, model, recorder
):
    planner = await make_planner("tool_calls")
    script_of(model).tool_calls(
        ("run_command", '{"command": "uname -a"}'),
        ("run_command", '{"command": "df -h"'),  # never closed
        ("run_commandz", '{"command": "uptime"}'),
    )
    streamed = await items(planner.plan(request(DEMO, tools)))
    assert [(t, a) for _, t, a in nodes_of(streamed)] == [(t, a) for _, t, a in DEMO_NODES]
    assert [r.usage_id for r in recorder.requests] == ["run-1/plan/0", "run-1/plan-repair/0"]
    repair = model.requests[1]["messages"]
    reply = repair[2]
    assert [c["function"]["name"] for c in reply["tool_calls"]] == [
        "run_command",
        "run_command",
        "run_commandz",
    ]
    results = [json.loads(m["content"]) for m in repair[3:6]]
    assert results[0] == {"status": "ACCEPTED", "node_id": "n1", "note": "running"}
    assert results[1]["status"] == "REJECTED"
    assert results[1]["problems"][0].startswith("arguments are not valid JSON")
    assert results[1]["problems"][1] == 'the arguments were: {"command": "df -h"'
    assert reply["tool_calls"][1]["function"]["arguments"] == "{}"  # history stays JSON
    assert "unknown tool 'run_commandz'" in results[2]["problems"][0]
    assert "Call again, corrected" in repair[6]["content"]


async def test_a_refusal_is_model_refused_after_its_usage(make_planner, tools, model, recorder):
    planner = await make_planner("tool_calls")
    script_of(model).deltas({"refusal": "I can't help "}, {"refusal": "with that."})
    seen = []
    with pytest.raises(FailedPrecondition) as raised:
        async for item in planner.plan(request(DEMO, tools)):
            seen.append(item)
    assert raised.value.reason == "MODEL_REFUSED"
    assert raised.value.message == f"model {MODEL} refused: I can't help with that."
    assert isinstance(seen[-1], CallUsage) and seen[-1].usage.output_tokens > 0
    assert [r.usage_id for r in recorder.requests] == ["run-1/plan/0"]


async def test_a_call_cut_by_the_token_limit_is_repaired(make_planner, tools, model):
    planner = await make_planner("tool_calls")
    script_of(model).tool_calls(
        ("run_command", '{"command": "uname -a"}'),
        ("run_command", '{"command": "df'),
        finish_reason="length",
    )
    streamed = await items(planner.plan(request(DEMO, tools)))
    assert [a["command"] for _, _, a in nodes_of(streamed)] == ["uname -a", "df -h", "uptime"]
    rejected = json.loads(model.requests[1]["messages"][4]["content"])
    assert "token limit (finish_reason: length)" in rejected["problems"][0]


async def test_calls_written_as_text_get_one_repair(make_planner, tools, model):
    planner = await make_planner("tool_calls")
    script_of(model).reply('<tool_call>{"name": "run_command", "arguments": {}}</tool_call>')
    streamed = await items(planner.plan(request(DEMO, tools)))
    assert not [i for i in streamed if isinstance(i, str)]  # the text was not an answer
    assert nodes_of(streamed) == DEMO_NODES
    repair = model.requests[1]["messages"]
    assert repair[2] == {"role": "assistant", "content": repair[2]["content"]}
    assert repair[2]["content"].startswith("<tool_call>")
    assert "wrote tool calls as text" in repair[3]["content"]
    # still text after the repair: the model meant it as its answer
    script_of(model).reply("[not a call]", times=2)
    streamed = await items(planner.plan(request(DEMO, tools, run_id="run-2")))
    assert [i for i in streamed if isinstance(i, str)] == ["[not a call]"]
    assert streamed[-1].answered


async def test_a_call_resent_under_its_id_runs_once(make_planner, tools, model, recorder):
    planner = await make_planner("tool_calls")
    script_of(model).tool_calls(
        ("run_command", '{"command": "uptime"}'),
        ("run_command", '{"command": "uptime"}'),
        ("run_command", '{"command": "df -h"}'),
        ids=["call_x", "call_x", "call_x"],
    )
    streamed = await items(planner.plan(request("uptime and disk", tools)))
    assert [a["command"] for _, _, a in nodes_of(streamed)] == ["uptime", "df -h"]
    assert [r.usage_id for r in recorder.requests] == ["run-1/plan/0"]  # nothing to repair


# --- misbehaviour: json_schema --------------------------------------------------------------


async def test_a_document_that_is_not_json_gets_one_repair(make_planner, tools, model):
    planner = await make_planner("json_schema")
    script_of(model).reply('Here you go: {"nodes": [{"node_id": "n1", "tool": ')
    streamed = await items(planner.plan(request(DEMO, tools)))
    assert nodes_of(streamed) == DEMO_NODES
    text = model.requests[1]["messages"][-1]["content"]
    assert "## Rejected nodes" in text and "node 1: " in text and "not valid JSON" in text
    assert 'one JSON object {"nodes": [...]}' in text


async def test_an_unknown_tool_node_is_repaired_the_valid_ones_stay(
    make_planner, tools, model, recorder
):
    planner = await make_planner("json_schema")
    script_of(model).plan(
        {"node_id": "n1", "tool": "run_command", "args": {"command": "uname -a"}, "depends_on": []},
        {"node_id": "n2", "tool": "disk_usage", "args": {}, "depends_on": []},
    )
    streamed = await items(planner.plan(request(DEMO, tools)))
    assert [a["command"] for _, _, a in nodes_of(streamed)] == ["uname -a", "df -h", "uptime"]
    text = model.requests[1]["messages"][-1]["content"]
    assert "node 2: " in text and "unknown tool 'disk_usage'" in text
    assert [r.usage_id for r in recorder.requests] == ["run-1/plan/0", "run-1/plan-repair/0"]


async def test_json_schema_refusal_and_cut_off(make_planner, tools, model):
    planner = await make_planner("json_schema")
    script_of(model).deltas({"refusal": "No."})
    with pytest.raises(FailedPrecondition) as raised:
        await items(planner.plan(request(DEMO, tools)))
    assert raised.value.reason == "MODEL_REFUSED"
    node = {"node_id": "n1", "tool": "run_command", "args": {"command": "uname -a"}}
    cut = '{"nodes": [' + json.dumps({**node, "depends_on": []}) + ', {"node_id": "n2", "to'
    script_of(model).deltas({"content": cut}, finish_reason="length")
    streamed = await items(planner.plan(request(DEMO, tools, run_id="run-2")))
    assert [a["command"] for _, _, a in nodes_of(streamed)] == ["uname -a", "df -h", "uptime"]
    assert "token limit" in model.requests[-1]["messages"][-1]["content"]


async def test_still_invalid_after_the_repair_is_invalid_plan(make_planner, tools, model):
    planner = await make_planner("tool_calls")
    for _ in range(2):
        script_of(model).tool_calls(("nope", "{}"))
    with pytest.raises(InvalidArgument) as raised:
        await items(planner.plan(request(DEMO, tools)))
    assert raised.value.reason == "INVALID_PLAN"
    assert "still invalid after one repair round" in raised.value.message
    assert "tool call 1" in raised.value.message
