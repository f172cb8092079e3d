"""The repair round: invalid model output is sent back once, with precise per-line errors.

Real openai client against the offline model (scripted replies), fake usage recorder;
one test goes through the gRPC servicer.
"""

from __future__ import annotations

import json

import pytest

from tests.support.model_script import script_of
from trellis.clients.costs import CostsClient
from trellis.clients.planner import PlannerClient
from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import from_struct, to_struct
from trellis.runtime.errors import InvalidArgument
from trellis_costs import service as costs_service
from trellis_costs.settings import CostsSettings
from trellis_planner.core import CallStarted, CallUsage, PlanEnd, PlanStarted
from trellis_planner.service import NAME, build
from trellis_planner.settings import PlannerSettings

DEMO = "Report this machine's OS, disk usage and uptime"


def line(node_id: str, tool: str, args: dict, depends_on: list[str] | None = None) -> str:
    node = {"node_id": node_id, "tool": tool, "args": args, "depends_on": depends_on or []}
    return json.dumps(node) + "\n"


def request(goal: str, tools, **kwargs) -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(run_id="run-1", goal=goal, tools=tools, **kwargs)


async def run(planner, plan_request) -> tuple[list, list]:
    """(items streamed before the end or the error, [PlanEnd] or [])."""
    items = []
    async for item in planner.plan(plan_request):
        if not isinstance(item, CallStarted | CallUsage | PlanStarted):
            items.append(item)
    return [i for i in items if not isinstance(i, PlanEnd)], [
        i for i in items if isinstance(i, PlanEnd)
    ]


def brief_item(item) -> str:
    """A streamed item in a word: a node's id, or a call's usage report."""
    if isinstance(item, CallStarted):
        return f"started {item.usage_id}"
    if isinstance(item, CallUsage):
        return f"used {item.usage_id}"
    if isinstance(item, PlanStarted):
        return f"format {item.plan_format}"
    return item.node_id


def brief(nodes) -> list[tuple[str, str, dict, list[str]]]:
    return [(n.node_id, n.tool, from_struct(n.args), list(n.depends_on)) for n in nodes]


async def test_malformed_plan_is_repaired_in_one_round(planner, tools, model, recorder):
    script_of(model).reply(
        line("n1", "run_command", {"command": "uname -a"})
        + "Sure! Here is the rest of the plan:\n"
        + line("n2", "run_commandz", {"command": "df -h"})
        + line("n3", "sleep", {"ms": "a while"})
        + line("n4", "echo", {"value": "$n2"}, ["n2"])
        + line("n5", "arithmetic", {"expression": "1+1"})
    )
    script_of(model).reply(
        line("n1", "run_command", {"command": "uname -a"})  # repeated unchanged: skipped
        + line("n2", "run_command", {"command": "df -h"})
        + line("n3", "sleep", {"ms": 10})
        + line("n4", "echo", {"value": "$n2"}, ["n2"])
    )
    nodes, [end] = await run(planner, request("anything", tools))

    assert brief(nodes) == [
        ("n1", "run_command", {"command": "uname -a"}, []),
        ("n5", "arithmetic", {"expression": "1+1"}, []),  # valid lines are never held back
        ("n2", "run_command", {"command": "df -h"}, []),
        ("n3", "sleep", {"ms": 10}, []),
        ("n4", "echo", {"value": "$n2"}, ["n2"]),
    ]
    # both calls are in the ledger, with distinct ids, and in the plan's usage
    first, repair = recorder.requests
    assert (first.usage_id, repair.usage_id) == ("run-1/plan/0", "run-1/plan-repair/0")
    assert not first.estimated and not repair.estimated
    assert end.usage.input_tokens == first.usage.input_tokens + repair.usage.input_tokens
    assert end.usage.output_tokens == first.usage.output_tokens + repair.usage.output_tokens
    assert end.usage.cost_nano_usd == 2 * recorder.cost

    # the repair call continues the conversation: the output, then every error by line
    plan_body, repair_body = model.requests
    assert repair_body["messages"][: len(plan_body["messages"])] == plan_body["messages"]
    assistant, user = repair_body["messages"][-2:]
    assert assistant["role"] == "assistant" and "Sure! Here is" in assistant["content"]
    text = user["content"]
    rejected = text.split("## Rejected lines\n")[1].split("## Accepted nodes")[0]
    assert "line 2: Sure! Here is the rest of the plan:\n  - not valid JSON" in rejected
    assert f"line 3: {line('n2', 'run_commandz', {'command': 'df -h'})}" in rejected
    assert "\n  - tool: unknown tool 'run_commandz' (known: arithmetic, echo," in rejected
    assert "line 4: " in rejected and "\n  - args.ms: 'a while' is not of type 'integer'" in (
        rejected
    )
    assert "line 5: " in rejected and "\n  - depends_on[0]: 'n2' is not an earlier" in rejected
    assert "\n  - args: references $n2, which is not an earlier node" in rejected
    assert "line 6" not in rejected
    accepted = text.split("## Accepted nodes\n")[1].split("\n\n")[0]
    assert [json.loads(x)["node_id"] for x in accepted.splitlines()[1:]] == ["n1", "n5"]
    assert "At most 48 more lines" in text


async def test_plan_still_invalid_after_the_repair_is_invalid_argument(
    planner, tools, model, recorder
):
    script_of(model).reply(line("n1", "echo", {"value": 1}) + line("n2", "nope", {}))
    script_of(model).reply(line("n2", "echo", {}) + line("n3", "echo", {"value": 3}))
    streamed = []
    with pytest.raises(InvalidArgument) as raised:
        async for item in planner.plan(request("anything", tools)):
            streamed.append(item)
    assert [brief_item(i) for i in streamed] == [
        "format jsonl",
        "started run-1/plan/0",
        "n1",  # a node streamed is never retracted
        "used run-1/plan/0",
        "started run-1/plan-repair/0",
        "used run-1/plan-repair/0",  # what the failed round cost, before the error
    ]
    assert streamed[-1].usage.output_tokens > 0 and not streamed[-1].deferred
    error = raised.value
    assert error.reason == "INVALID_PLAN"
    assert "still invalid after one repair round" in error.message
    assert [(v.field, v.description) for v in error.violations] == [
        ("plan[1].args.value", "'value' is a required property")
    ]
    assert [r.usage_id for r in recorder.requests] == ["run-1/plan/0", "run-1/plan-repair/0"]
    assert len(model.requests) == 2  # one repair round, no more


async def test_the_rules_model_answers_a_repair_with_the_rest_of_the_plan(
    planner, tools, model, recorder
):
    # only the first reply is scripted: the offline rules answer the repair request
    script_of(model).reply(line("n1", "run_command", {"command": "uname -a"}) + "{oops\n")
    nodes, [_] = await run(planner, request(DEMO, tools))
    assert brief(nodes) == [
        ("n1", "run_command", {"command": "uname -a"}, []),
        ("n2", "run_command", {"command": "df -h"}, []),
        ("n3", "run_command", {"command": "uptime"}, []),
    ]
    assert len(recorder.requests) == 2


async def test_a_reference_may_stand_where_a_value_is_expected(planner, tools, model, recorder):
    script_of(model).reply(
        line("n1", "sleep", {"ms": 5})
        + line("n2", "sleep", {"ms": "${n1.slept_ms}"})
        + line("n3", "run_command", {"command": "$n1"})
        + line("n4", "arithmetic", {"expression": "${n1.slept_ms} * 2"})
    )
    nodes, [_] = await run(planner, request("anything", tools))
    assert [list(n.depends_on) for n in nodes] == [[], ["n1"], ["n1"], ["n1"]]
    assert len(model.requests) == 1 and len(recorder.requests) == 1  # nothing to repair


async def test_over_max_nodes_is_not_repaired(planner, tools, model, recorder):
    items = []
    with pytest.raises(InvalidArgument) as raised:
        async for item in planner.plan(request(DEMO, tools, max_nodes=2)):
            items.append(item)
    assert [brief_item(i) for i in items] == [
        "format jsonl",
        "started run-1/plan/0",
        "n1",
        "n2",
        "used run-1/plan/0",
    ]
    assert "more than 2 nodes" in raised.value.message
    assert len(model.requests) == 1  # a full plan has no room for a repaired node
    [recorded] = recorder.requests
    assert recorded.usage_id == "run-1/plan/0"


async def test_a_full_plan_with_rejected_lines_is_not_repaired(planner, tools, model):
    script_of(model).reply(
        line("n1", "echo", {"value": 1}) + line("n2", "x", {}) + line("n3", "echo", {"value": 3})
    )
    with pytest.raises(InvalidArgument) as raised:
        await run(planner, request("anything", tools, max_nodes=2))
    assert [v.field for v in raised.value.violations] == ["plan[1].tool"]
    assert len(model.requests) == 1


async def test_repair_over_grpc(serve, channels, model, tools, tmp_path):
    costs = await serve(
        costs_service.NAME,
        costs_service.build,
        CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{tmp_path}/costs.db"),
    )
    settings = PlannerSettings(
        port=0, metrics_port=0, openai_base_url=model.base_url, costs_target=costs.target
    )
    server = await serve(NAME, build, settings)
    client = PlannerClient(channels.get(server.target), timeout=30)
    script_of(model).reply("not a plan\n")
    script_of(model).reply(line("n1", "arithmetic", {"expression": "2+3"}))
    responses = [r async for r in client.plan(request("What is 2+3?", tools))]
    assert [r.WhichOneof("event") for r in responses] == [
        "started",
        *["usage"] * 3,
        "node",
        "usage",
        "done",
    ]
    plan, repair = responses[2].usage, responses[5].usage
    assert (plan.usage_id, repair.usage_id) == ("run-1/plan/0", "run-1/plan-repair/0")
    assert responses[4].node.tool == "arithmetic"
    done = responses[6].done
    assert done.usage.output_tokens == plan.usage.output_tokens + repair.usage.output_tokens > 0
    assert done.usage.cost_nano_usd == plan.usage.cost_nano_usd + repair.usage.cost_nano_usd
    report = await CostsClient(channels.get(costs.target)).get_usage()
    [row] = report.rows
    assert row.events == 2  # the plan and its repair


async def test_an_output_far_off_track_is_cut_short(planner, tools, model, recorder):
    script_of(model).reply("".join(f"Step {i}: think about it.\n" for i in range(1, 31)))
    script_of(model).reply(line("n1", "arithmetic", {"expression": "1+1"}))
    nodes, [_] = await run(planner, request("anything", tools))
    assert len(nodes) == 1
    repair_prompt = model.requests[1]["messages"][-1]["content"]
    assert "line 10: Step 10" in repair_prompt and "line 11:" not in repair_prompt
    assert recorder.requests[0].estimated  # the first call was not read to its end


async def test_a_replan_round_is_repaired_under_its_own_round(planner, tools, model, recorder):
    earlier = common_pb2.ToolCall(
        node_id="n1", tool="arithmetic", args=to_struct({"expression": "1+1"})
    )
    script_of(model).reply(line("n1", "echo", {"value": "$n1"}))  # reuses an earlier round's id
    script_of(model).reply(line("n2", "echo", {"value": "$n1"}))  # may depend on it
    nodes, [_] = await run(
        planner, request("anything", tools, round=1, previous_plan=[earlier], attempt=2)
    )
    assert brief(nodes) == [("n2", "echo", {"value": "$n1"}, ["n1"])]
    assert "used by an earlier round's plan" in model.requests[1]["messages"][-1]["content"]
    assert [r.usage_id for r in recorder.requests] == [
        "run-1/plan/1/2",
        "run-1/plan-repair/1/2",
    ]
