"""PlannerService over real gRPC, with the offline model and a stand-in costs service."""

from __future__ import annotations

import pytest
from grpc import aio

from tests.support.model_script import script_of
from trellis.clients.planner import PlannerClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2, costs_pb2_grpc
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, to_struct, to_value
from trellis.runtime.errors import InvalidArgument, Unavailable
from trellis.runtime.server import Service
from trellis_planner.service import NAME, build
from trellis_planner.settings import PlannerSettings

DEMO = "Report this machine's OS, disk usage and uptime"


class StandInCosts(costs_pb2_grpc.CostAccountingServiceServicer):
    """Just enough of cost accounting to see what the planner records (and for whom)."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, costs_pb2.RecordUsageRequest]] = []

    async def RecordUsage(self, request, ctx: aio.ServicerContext):
        self.recorded.append((context.tenant(), request))
        return costs_pb2.RecordUsageResponse(cost_nano_usd=777)

    async def RecordUsages(self, request, ctx: aio.ServicerContext):
        results = []
        for entry in request.entries:
            self.recorded.append((context.tenant(), entry))
            results.append(costs_pb2.RecordUsageResult(usage_id=entry.usage_id, cost_nano_usd=777))
        return costs_pb2.RecordUsagesResponse(results=results)


@pytest.fixture
async def costs(serve):
    servicer = StandInCosts()

    async def build_costs(settings, telemetry, channels) -> Service:
        def register(server: aio.Server) -> None:
            costs_pb2_grpc.add_CostAccountingServiceServicer_to_server(servicer, server)

        return Service("costs", ["trellis.costs.v1.CostAccountingService"], register)

    from trellis.runtime.settings import ServiceSettings

    server = await serve("costs", build_costs, ServiceSettings(port=0))
    servicer.target = server.target
    return servicer


async def start_planner(
    serve, channels, model, costs_target: str, **overrides: object
) -> PlannerClient:
    settings = PlannerSettings(
        port=0,
        metrics_port=0,
        openai_base_url=model.base_url,
        costs_target=costs_target,
        **overrides,  # type: ignore[arg-type]
    )
    server = await serve(NAME, build, settings)
    return PlannerClient(channels.get(server.target), timeout=30)


@pytest.fixture
async def planner(serve, channels, model, costs) -> PlannerClient:
    return await start_planner(serve, channels, model, costs.target)


async def responses(stream) -> tuple[list, object]:
    """(nodes or answer deltas, the ``done`` response), without the usage events and
    the plan's ``started``."""
    items = [item async for item in stream if item.WhichOneof("event") not in ("usage", "started")]
    return items[:-1], items[-1]


async def test_demo_goal_streams_three_command_nodes_then_done(planner, tools, costs):
    request = planner_pb2.PlanRequest(run_id="r1", goal=DEMO, tools=tools)
    with context.request_scope(tenant_id="acme"):
        nodes, last = await responses(planner.plan(request))
    assert [r.WhichOneof("event") for r in nodes] == ["node"] * 3
    assert [(r.node.node_id, r.node.tool, from_struct(r.node.args)) for r in nodes] == [
        ("n1", "run_command", {"command": "uname -a"}),
        ("n2", "run_command", {"command": "df -h"}),
        ("n3", "run_command", {"command": "uptime"}),
    ]
    assert all(list(r.node.depends_on) == [] for r in nodes)
    usage = last.done.usage
    assert last.WhichOneof("event") == "done"
    assert usage.model == "trellis-offline-rules-v1"
    assert usage.input_tokens > 0 and usage.output_tokens > 0 and usage.cost_nano_usd == 777
    [(tenant, recorded)] = costs.recorded
    assert (tenant, recorded.usage_id) == ("acme", "r1/plan/0")


async def test_arithmetic_goal(planner, tools):
    request = planner_pb2.PlanRequest(run_id="r2", goal="What is (17*23)+4?", tools=tools)
    nodes, last = await responses(planner.plan(request))
    assert [(r.node.tool, from_struct(r.node.args)) for r in nodes] == [
        ("arithmetic", {"expression": "(17*23)+4"})
    ]
    assert last.done.usage.output_tokens > 0


async def test_join_answers_and_finishes(planner):
    request = planner_pb2.JoinRequest(
        run_id="r3",
        goal="What is (17*23)+4?",
        plan=[
            common_pb2.ToolCall(
                node_id="n1", tool="arithmetic", args=to_struct({"expression": "(17*23)+4"})
            )
        ],
        outcomes=[
            common_pb2.NodeOutcome(
                node_id="n1",
                status=common_pb2.NODE_STATUS_SUCCEEDED,
                output=to_value({"result": 395}),
            )
        ],
        allow_replan=True,
    )
    deltas, last = await responses(planner.join(request))
    assert all(r.WhichOneof("event") == "answer_delta" for r in deltas)
    assert "(17*23)+4 = 395" in "".join(r.answer_delta for r in deltas)
    assert last.done.decision == planner_pb2.JOIN_DECISION_FINISH
    assert last.done.usage.cost_nano_usd == 777


async def test_scripted_replan(planner, model):
    script_of(model).reply("REPLAN: need more data")
    request = planner_pb2.JoinRequest(run_id="r4", goal="g", allow_replan=True)
    deltas, last = await responses(planner.join(request))
    assert deltas == []
    assert (last.done.decision, last.done.reason) == (
        planner_pb2.JOIN_DECISION_REPLAN,
        "need more data",
    )


async def test_scripted_unknown_tool_is_invalid_plan(planner, tools, model):
    bad = '{"node_id": "n1", "tool": "format_disk", "args": {}, "depends_on": []}\n'
    script_of(model).reply(bad, times=2)  # the plan, then the repair
    with pytest.raises(InvalidArgument) as raised:
        await responses(planner.plan(planner_pb2.PlanRequest(run_id="r5", goal="x", tools=tools)))
    assert raised.value.reason == "INVALID_PLAN"
    assert [v.field for v in raised.value.violations] == ["plan[0].tool"]


async def test_scripted_500_is_unavailable_after_retries(planner, tools, model):
    # The openai client tries 3 times; the planner's UNAVAILABLE carries retry pushback -1,
    # so the channel's retry policy does not repeat the whole Plan (no 3 x 4 amplification).
    script_of(model).fail(500, times=12, retry_after_ms=1)
    with pytest.raises(Unavailable) as raised:
        await responses(planner.plan(planner_pb2.PlanRequest(run_id="r6", goal=DEMO, tools=tools)))
    assert raised.value.reason == "MODEL_UNAVAILABLE"
    assert len(model.requests) == 3


async def test_a_broken_model_stream_is_unavailable_not_internal(planner, tools, model, costs):
    script_of(model).break_stream(after_pieces=5)  # the rules' plan, cut by an event not JSON
    request = planner_pb2.PlanRequest(run_id="r8", goal=DEMO, tools=tools)
    with pytest.raises(Unavailable) as raised:
        await responses(planner.plan(request))
    assert raised.value.reason == "MODEL_BAD_RESPONSE"
    assert raised.value.metadata == {"model": "trellis-offline-rules-v1"}
    [(_, recorded)] = costs.recorded
    assert recorded.usage_id == "r8/plan/0" and recorded.estimated
    assert len(model.requests) == 1  # UNAVAILABLE with pushback: the Plan is not repeated


async def test_a_plan_line_over_the_limit_is_invalid_plan(serve, channels, model, tools, costs):
    planner = await start_planner(serve, channels, model, costs.target, max_plan_line_bytes=1024)
    long_value = '"' + "x" * 2000 + '"'
    script_of(model).reply(
        '{"node_id": "n1", "tool": "echo", "args": {"value": 1}}\n'
        f'{{"node_id": "n2", "tool": "echo", "args": {{"value": {long_value}}}}}\n'
    )
    request = planner_pb2.PlanRequest(run_id="r9", goal="x", tools=tools)
    seen = []
    with pytest.raises(InvalidArgument) as raised:
        async for response in planner.plan(request):
            seen.append(response.WhichOneof("event"))
    # the node before the long line went out, and the call's usage before the error
    assert seen == ["started", "usage", "node", "usage"]
    assert raised.value.reason == "INVALID_PLAN"
    assert [(v.field, v.description) for v in raised.value.violations] == [
        ("plan", "line 2 is longer than 1024 bytes")
    ]


async def test_empty_goal_is_invalid_argument(planner, tools):
    with pytest.raises(InvalidArgument) as raised:
        await responses(planner.plan(planner_pb2.PlanRequest(goal="", tools=tools)))
    assert [v.field for v in raised.value.violations] == ["goal"]


async def test_missing_costs_service_does_not_break_planning(serve, channels, model, tools):
    planner = await start_planner(serve, channels, model, "127.0.0.1:1")
    nodes, last = await responses(
        planner.plan(planner_pb2.PlanRequest(run_id="r7", goal=DEMO, tools=tools))
    )
    assert len(nodes) == 3
    assert last.done.usage.input_tokens > 0 and last.done.usage.cost_nano_usd == 0
