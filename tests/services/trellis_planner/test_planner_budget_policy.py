"""The planner's budget check over real gRPC: a refusal names the limit that was hit, and
TRELLIS_BUDGET_FAIL_OPEN=false refuses a model call cost accounting cannot check.
(The policy itself, shared with the executor, is tested in tests/libs/trellis.)"""

from __future__ import annotations

import pytest

from tests.support.dead_target import dead_target
from trellis.clients.costs import CostsClient
from trellis.clients.planner import PlannerClient
from trellis.costs.v1 import costs_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.errors import ResourceExhausted, Unavailable
from trellis_costs.service import NAME as COSTS
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings
from trellis_planner.service import NAME, build
from trellis_planner.settings import PlannerSettings

GOAL = "What is (17*23)+4?"


async def planner(serve, channels, model, tmp_path, costs_target: str, **settings) -> PlannerClient:
    server = await serve(
        NAME,
        build,
        PlannerSettings(
            port=0,
            metrics_port=0,
            openai_base_url=model.base_url,
            costs_target=costs_target,
            outbox_path=tmp_path / "planner-outbox.db",
            **settings,
        ),
    )
    return PlannerClient(channels.get(server.target), timeout=30)


async def plan(client: PlannerClient, tools) -> list[planner_pb2.PlanResponse]:
    request = planner_pb2.PlanRequest(run_id="r1", goal=GOAL, tools=tools)
    with context.request_scope(tenant_id="acme"):
        return [event async for event in client.plan(request)]


async def test_a_refused_model_call_names_the_monthly_limit(
    serve, channels, model, tools, tmp_path
) -> None:
    costs_server = await serve(
        COSTS,
        build_costs,
        CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{tmp_path}/ledger.db"),
    )
    costs = CostsClient(channels.get(costs_server.target))
    with context.request_scope(tenant_id="acme"):
        # Plenty left today, 1 nano-USD this month: less than any call's estimate.
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(daily_limit_nano_usd=10**12, monthly_limit_nano_usd=1)
        )
    client = await planner(serve, channels, model, tmp_path, costs_server.target)
    with pytest.raises(ResourceExhausted) as raised:
        await plan(client, tools)
    error = raised.value
    assert error.reason == "BUDGET_EXCEEDED"
    assert "over its monthly budget" in error.message and "not called" in error.message
    assert error.metadata["limit"] == "monthly"
    assert len(model.requests) == 0


async def test_failing_closed_no_model_call_is_made_without_a_check(
    serve, channels, model, tools, tmp_path
) -> None:
    client = await planner(serve, channels, model, tmp_path, dead_target(), budget_fail_open=False)
    with pytest.raises(Unavailable) as raised:
        await plan(client, tools)
    assert raised.value.reason == "BUDGET_UNAVAILABLE"
    assert len(model.requests) == 0


async def test_failing_open_the_model_is_called_without_a_check(
    serve, channels, model, tools, tmp_path
) -> None:
    client = await planner(serve, channels, model, tmp_path, dead_target())
    events = await plan(client, tools)
    assert events[-1].WhichOneof("event") == "done"
    assert len(model.requests) == 1
