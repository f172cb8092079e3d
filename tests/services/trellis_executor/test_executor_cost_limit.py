"""The run cost limit without servers: how RunOptions and the server setting combine, the
meter's arithmetic, and a scheduler that stops at the node which crossed the limit."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import to_struct
from trellis_executor.limits import CostMeter, Limits, RunCostExceeded
from trellis_executor.plan import NodeChecker
from trellis_executor.scheduler import DagScheduler, SchedulerEvents
from trellis_executor.settings import ExecutorSettings

SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
CANCELLED = common_pb2.NODE_STATUS_CANCELLED


def limit_of(option: int, setting_usd: str) -> int:
    settings = ExecutorSettings(max_run_cost_usd=Decimal(setting_usd))
    options = executor_pb2.RunOptions(max_cost_nano_usd=option)
    return Limits.of(options, settings).max_cost_nano_usd


@pytest.mark.parametrize(
    ("option", "setting", "expected"),
    [
        (0, "0", 0),  # no limit anywhere
        (500, "0", 500),  # the run's own
        (0, "0.000001", 1000),  # the server's default
        (5000, "0.000001", 1000),  # ... is also the ceiling
        (200, "0.000001", 200),  # a lower one is kept
    ],
)
def test_the_run_limit_combines_option_and_setting(option: int, setting: str, expected: int):
    assert limit_of(option, setting) == expected


def test_the_setting_is_usd_and_the_limit_nano_usd() -> None:
    assert ExecutorSettings(max_run_cost_usd="0.50").max_run_cost_nano_usd == 500_000_000


def test_the_meter_raises_once_the_total_is_over_not_at_it() -> None:
    meter = CostMeter(1000, spent_nano_usd=400)
    meter.charge(600, "node a")  # exactly at the limit: fine
    with pytest.raises(RunCostExceeded) as raised:
        meter.charge(1, "node b")
    error = raised.value
    assert (error.reason, error.retryable) == ("RUN_COST_EXCEEDED", False)
    assert error.metadata == {"limit_nano_usd": "1000", "cost_nano_usd": "1001"}
    assert "after node b" in error.message
    CostMeter(0).charge(10**15, "anything")  # 0: no limit


async def test_the_node_that_crosses_the_limit_stops_the_scheduler() -> None:
    async def run_node(call: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        if call.tool == "sleep":
            await asyncio.sleep(30)
        return common_pb2.NodeOutcome(node_id=call.node_id, status=SUCCEEDED, cost_nano_usd=600)

    meter = CostMeter(1000)
    scheduler = DagScheduler(
        run_node,
        SchedulerEvents(),
        max_parallel=8,
        on_outcome=lambda outcome: meter.charge(outcome.cost_nano_usd, outcome.node_id),
    )

    async def plan():
        for node_id, tool, deps in [
            ("a", "paid", ()),
            ("b", "paid", ("a",)),
            ("c", "paid", ("b",)),
            ("slow", "sleep", ()),
        ]:
            yield common_pb2.ToolCall(
                node_id=node_id, tool=tool, args=to_struct({}), depends_on=deps
            )

    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(scheduler.run(plan(), NodeChecker(["paid", "sleep"], 10)), 10)
    assert raised.group_contains(RunCostExceeded)
    assert meter.spent_nano_usd == 1200
    assert {n: o.status for n, o in scheduler.outcomes.items()} == {
        "a": SUCCEEDED,
        "b": SUCCEEDED,  # crossed the limit: recorded, then the run stopped
        "slow": CANCELLED,  # in flight: cancelled
    }  # and "c" never started
