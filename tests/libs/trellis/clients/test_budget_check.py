"""trellis.clients.budget_check: the one policy of the executor's and the planner's budget checks.

Checks are plain coroutines here (what cost accounting answered, or how it failed); the
services' own tests run the same policy over real gRPC.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from trellis.clients.budget_check import BudgetPolicy, limits_hit, require_budget
from trellis.costs.v1 import costs_pb2
from trellis.runtime.context import request_scope
from trellis.runtime.errors import ResourceExhausted, Unavailable

Response = costs_pb2.CheckBudgetResponse
OUTCOMES = ("allowed", "denied", "unavailable_allowed", "unavailable_denied")


def counts() -> dict[str, float]:
    return {
        outcome: REGISTRY.get_sample_value("trellis_budget_checks_total", {"outcome": outcome})
        or 0.0
        for outcome in OUTCOMES
    }


def answering(response: Response):
    async def check() -> Response:
        return response

    return check


def failing(error: BaseException):
    async def check() -> Response:
        raise error

    return check


async def hanging() -> Response:
    await asyncio.Event().wait()  # a cost accounting that never answers
    raise AssertionError("unreachable")


def delta(before: dict[str, float]) -> dict[str, float]:
    after = counts()
    return {k: after[k] - before[k] for k in OUTCOMES if after[k] != before[k]}


async def test_an_allowed_check_returns_and_is_counted() -> None:
    before = counts()
    await require_budget(answering(Response(allowed=True)), BudgetPolicy(), refused="x")
    assert delta(before) == {"allowed": 1}


@pytest.mark.parametrize(
    ("response", "hit", "message"),
    [
        (
            Response(
                daily_limit_nano_usd=100, spent_today_nano_usd=100, monthly_limit_nano_usd=10**6
            ),
            ["daily"],
            "over its daily budget",
        ),
        (
            Response(
                daily_limit_nano_usd=10**6,
                spent_today_nano_usd=10,
                monthly_limit_nano_usd=500,
                spent_this_month_nano_usd=450,
                estimated_cost_nano_usd=60,
            ),
            ["monthly"],
            "over its monthly budget",
        ),
        (
            Response(
                monthly_limit_nano_usd=500, spent_this_month_nano_usd=100, reserved_nano_usd=400
            ),
            ["monthly"],
            "over its monthly budget",
        ),
        (
            Response(
                daily_limit_nano_usd=100,
                spent_today_nano_usd=100,
                monthly_limit_nano_usd=100,
                spent_this_month_nano_usd=100,
            ),
            ["daily", "monthly"],
            "over its daily and monthly budgets",
        ),
    ],
    ids=["daily", "monthly-estimate", "monthly-holds", "both"],
)
async def test_a_refusal_names_the_limit_that_was_hit(
    response: Response, hit: list[str], message: str
) -> None:
    assert limits_hit(response) == hit
    before = counts()
    with request_scope(tenant_id="acme"), pytest.raises(ResourceExhausted) as raised:
        await require_budget(
            answering(response), BudgetPolicy(), refused="no run started", metadata={"k": "v"}
        )
    error = raised.value
    assert error.reason == "BUDGET_EXCEEDED"
    assert error.message == f"tenant acme is {message}; no run started"
    limit, spent = (
        (response.daily_limit_nano_usd, response.spent_today_nano_usd)
        if hit[0] == "daily"
        else (response.monthly_limit_nano_usd, response.spent_this_month_nano_usd)
    )
    assert error.metadata == {
        "k": "v",
        "limit": ",".join(hit),
        "limit_nano_usd": str(limit),
        "spent_nano_usd": str(spent),
        "reserved_nano_usd": str(response.reserved_nano_usd),
        "estimated_cost_nano_usd": str(response.estimated_cost_nano_usd),
    }
    assert delta(before) == {"denied": 1}


@pytest.mark.parametrize(
    "check",
    [failing(Unavailable("costs is down")), failing(RuntimeError("boom")), hanging],
    ids=["unavailable", "error", "no-answer"],
)
async def test_without_an_answer_fail_open_goes_ahead_with_a_warning(check) -> None:
    before = counts()
    with capture_logs() as logs:
        await require_budget(
            check, BudgetPolicy(timeout_seconds=0.05), refused="x", metadata={"model": "m"}
        )
    assert delta(before) == {"unavailable_allowed": 1}
    [warning] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warning["event"] == "budget not checked: cost accounting did not answer"
    assert (warning["fail_open"], warning["model"]) == (True, "m")


@pytest.mark.parametrize(
    "check",
    [failing(Unavailable("costs is down")), hanging],
    ids=["unavailable", "no-answer"],
)
async def test_without_an_answer_fail_closed_refuses_unavailable(check) -> None:
    before = counts()
    policy = BudgetPolicy(fail_open=False, timeout_seconds=0.05)
    with (
        capture_logs() as logs,
        request_scope(tenant_id="acme"),
        pytest.raises(Unavailable) as raised,
    ):
        await require_budget(check, policy, refused="model m not called", metadata={"model": "m"})
    assert [entry["fail_open"] for entry in logs if entry["log_level"] == "warning"] == [False]
    assert raised.value.reason == "BUDGET_UNAVAILABLE"
    assert raised.value.message == (
        "the budget of tenant acme could not be checked; model m not called"
    )
    assert raised.value.metadata == {"model": "m"}
    assert delta(before) == {"unavailable_denied": 1}


def test_the_policy_comes_from_the_services_settings(monkeypatch) -> None:
    from trellis_executor.settings import ExecutorSettings
    from trellis_planner.settings import PlannerSettings

    assert BudgetPolicy.of(PlannerSettings()) == BudgetPolicy(fail_open=True, timeout_seconds=1.0)
    monkeypatch.setenv("TRELLIS_BUDGET_FAIL_OPEN", "false")
    monkeypatch.setenv("TRELLIS_BUDGET_CHECK_TIMEOUT_SECONDS", "0.25")
    expected = BudgetPolicy(fail_open=False, timeout_seconds=0.25)
    assert BudgetPolicy.of(PlannerSettings()) == expected
    assert BudgetPolicy.of(ExecutorSettings(auth=False)) == expected
