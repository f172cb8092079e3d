"""Model usage is never lost and each model call is one ledger row, reserved and settled
under one usage_id.

Over real gRPC: a planner whose cost accounting is not there yet still plans and joins
(cost 0), keeps the usage in its outbox file, and delivers it, under the caller's
tenant, once cost accounting comes up, with the cost a call with it up gets. In the
core: the budget check carries the call's estimate and reservation id, which is the
usage_id of the row recorded for that call, also when a fallback model answered.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from tests.support.model_script import script_of
from trellis.clients.planner import PlannerClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct, to_value
from trellis.runtime.ports import free_port
from trellis_costs.service import NAME as COSTS
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings
from trellis_planner.core import Planner
from trellis_planner.model import ChatModel
from trellis_planner.service import NAME, build, make_client
from trellis_planner.settings import PlannerSettings

DEMO = "Report this machine's OS, disk usage and uptime"
MODEL = "trellis-offline-rules-v1"


def join_request(run_id: str) -> planner_pb2.JoinRequest:
    call = common_pb2.ToolCall(node_id="n1", tool="echo", args=to_struct({"value": "hi"}))
    outcome = common_pb2.NodeOutcome(
        node_id="n1", status=common_pb2.NODE_STATUS_SUCCEEDED, output=to_value("hi")
    )
    return planner_pb2.JoinRequest(
        run_id=run_id, goal="What did it say?", plan=[call], outcomes=[outcome], round=0
    )


def outbox_rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT tenant_id, usage_id FROM usage_outbox ORDER BY seq").fetchall()


def ledger_rows(path: Path) -> dict[str, tuple]:
    """usage_id -> (tenant, model, input, output, cost, estimated) of the ledger file."""
    if not path.exists():
        return {}
    with sqlite3.connect(path) as conn:
        found = conn.execute(
            "SELECT usage_id, tenant_id, model, input_tokens, output_tokens, cost_nano_usd,"
            " estimated FROM usage"
        ).fetchall()
    return {row[0]: row[1:] for row in found}


async def test_usage_cost_accounting_missed_is_delivered_once_it_is_back(
    serve, channels, model, tools, tmp_path: Path
) -> None:
    costs_port = free_port()  # cost accounting will listen here, later
    outbox = tmp_path / "planner-outbox.db"
    planner_server = await serve(
        NAME,
        build,
        PlannerSettings(
            port=0,
            metrics_port=0,
            openai_base_url=model.base_url,
            costs_target=f"127.0.0.1:{costs_port}",
            outbox_path=outbox,
        ),
    )
    planner = PlannerClient(channels.get(planner_server.target), timeout=30)

    async def plan_and_join(run_id: str) -> tuple[common_pb2.Usage, common_pb2.Usage]:
        request = planner_pb2.PlanRequest(run_id=run_id, goal=DEMO, tools=tools)
        planned = [event async for event in planner.plan(request)]
        joined = [event async for event in planner.join(join_request(run_id))]
        return planned[-1].done.usage, joined[-1].done.usage

    with context.request_scope(tenant_id="acme"):
        plan_usage, join_usage = await plan_and_join("down")  # plans all the same ...
    assert plan_usage.input_tokens > 0 and plan_usage.cost_nano_usd == 0  # ... costed later
    assert join_usage.output_tokens > 0 and join_usage.cost_nano_usd == 0
    assert outbox_rows(outbox) == [("acme", "down/plan/0"), ("acme", "down/join/0")]

    ledger = tmp_path / "ledger.db"
    await serve(
        COSTS,
        build_costs,
        CostsSettings(port=costs_port, metrics_port=0, database_url=f"sqlite:///{ledger}"),
    )
    deadline = time.monotonic() + 30
    while outbox_rows(outbox) or len(ledger_rows(ledger)) < 2:
        assert time.monotonic() < deadline, "the outbox was not delivered within 30 s"
        await asyncio.sleep(0.05)

    with context.request_scope(tenant_id="acme"):
        up_plan, up_join = await plan_and_join("up")  # the same calls, costs up: the control
    assert up_plan.cost_nano_usd > 0 and up_join.cost_nano_usd > 0
    rows = ledger_rows(ledger)
    assert sorted(rows) == ["down/join/0", "down/plan/0", "up/join/0", "up/plan/0"]
    for step, usage, control in (("plan", plan_usage, up_plan), ("join", join_usage, up_join)):
        expected = (
            "acme",
            MODEL,
            usage.input_tokens,
            usage.output_tokens,
            control.cost_nano_usd,
            0,
        )
        assert rows[f"down/{step}/0"] == expected
        assert rows[f"up/{step}/0"][1:4] == expected[1:4]  # same tokens, hence same cost
    assert outbox_rows(outbox) == []


# --- reservations: one call, one check, one row, one id ----------------------------------


@dataclass
class RecordingBudget:
    """CheckBudget as an allowing cost accounting answers it, keeping each request."""

    checks: list[tuple[common_pb2.Usage | None, str]] = field(default_factory=list)

    async def check_budget(
        self,
        estimated_cost_nano_usd: int = 0,
        *,
        estimated_usage: common_pb2.Usage | None = None,
        reservation_id: str = "",
    ) -> costs_pb2.CheckBudgetResponse:
        self.checks.append((estimated_usage, reservation_id))
        return costs_pb2.CheckBudgetResponse(allowed=True)


@pytest.fixture
async def reserving(model, recorder, make_outbox):
    """(planner, budget, recorder): a core planner whose model checks RecordingBudget."""
    budget = RecordingBudget()
    settings = PlannerSettings(openai_base_url=model.base_url, model_max_retries=0)
    chat = ChatModel(
        make_client(settings),
        TracerProvider().get_tracer("test"),
        timeout=10,
        fallback_models=["backup-model"],
        budget=budget,
        expected_output_tokens=300,
    )
    planner = Planner(
        chat, await make_outbox(recorder.record_usage), default_model=MODEL, max_nodes=50
    )
    yield planner, budget, recorder
    await chat.aclose()


async def test_the_reservation_is_the_usage_id_of_the_recorded_row(reserving, tools) -> None:
    planner, budget, recorder = reserving
    request = planner_pb2.PlanRequest(run_id="r1", goal=DEMO, tools=tools)
    _ = [item async for item in planner.plan(request)]
    _ = [item async for item in planner.join(join_request("r1"))]
    assert [reservation for _, reservation in budget.checks] == ["r1/plan/0", "r1/join/0"]
    assert [r.usage_id for r in recorder.requests] == ["r1/plan/0", "r1/join/0"]
    for estimate, _ in budget.checks:
        assert estimate is not None and estimate.model == MODEL
        assert estimate.input_tokens > 0 and estimate.output_tokens == 300
    # the estimate of the input is the one the rate limits use: close to the real count
    plan_estimate, _ = budget.checks[0]
    real = recorder.requests[0].usage.input_tokens
    assert real / 2 < plan_estimate.input_tokens < real * 2


async def test_a_call_outside_a_run_reserves_under_its_fresh_usage_id(reserving, tools) -> None:
    planner, budget, recorder = reserving
    request = planner_pb2.PlanRequest(goal="What is 1+1?", tools=tools)
    _ = [item async for item in planner.plan(request)]
    [(_, reservation)] = budget.checks
    [recorded] = recorder.requests
    assert len(reservation) == 36 and reservation == recorded.usage_id


async def test_a_fallback_is_still_one_check_and_one_row(reserving, tools, model) -> None:
    planner, budget, recorder = reserving
    script_of(model).fail(503, retry_after_ms=1)  # the primary fails before any stream opens
    request = planner_pb2.PlanRequest(run_id="r2", goal=DEMO, tools=tools)
    _ = [item async for item in planner.plan(request)]
    assert [m["model"] for m in model.requests] == [MODEL, "backup-model"]
    [(estimate, reservation)] = budget.checks
    [recorded] = recorder.requests
    assert reservation == recorded.usage_id == "r2/plan/0"
    assert estimate.model == MODEL  # the check is made once, for the model asked for


def test_outbox_path_is_checked_at_start_up(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRELLIS_OUTBOX_PATH", str(tmp_path))
    with pytest.raises(ValueError, match="is a directory"):
        PlannerSettings()
    monkeypatch.setenv("TRELLIS_OUTBOX_PATH", str(tmp_path / "usage" / "planner.db"))
    assert PlannerSettings().outbox_path == tmp_path / "usage" / "planner.db"
