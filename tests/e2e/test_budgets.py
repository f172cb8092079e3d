"""Budget checks across real services (issue 13): the executor and the planner share one
policy when cost accounting cannot answer, and a refusal names the limit that was hit.

Fail open (the default): with cost accounting stopped, an explicit plan and a goal run
both succeed, both services count the unanswered checks, and once cost accounting is
back the usage outboxes deliver every model call and tool execution of those runs to
the ledger exactly once. A cost accounting that accepts connections and never answers
delays a run's start by about the check timeout, not the call timeout. Fail closed
(``TRELLIS_BUDGET_FAIL_OPEN=false``) refuses the run UNAVAILABLE ``BUDGET_UNAVAILABLE``
before anything is stored.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trellis.clients.costs import CostsClient
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import NotFound, ResourceExhausted, Unavailable
from trellis_cli.stack import start_stack

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
TENANT = "frugal"
GOAL = "Compute (17*23)+4, then echo the result"
#: Never cached, so every run executes (and bills) every node.
TOOLS_FILE = (
    "version: 1\ntools:\n"
    "  - {name: arithmetic, builtin: arithmetic, cache_ttl: 0, cost_nano_usd: 1000}\n"
    "  - {name: echo, builtin: echo, cache_ttl: 0}\n"
)


def echo_plan(*ids: str) -> list[common_pb2.ToolCall]:
    return [
        common_pb2.ToolCall(node_id=node_id, tool="echo", args=to_struct({"value": node_id}))
        for node_id in ids
    ]


async def run(executor: ExecutorClient, request: executor_pb2.RunRequest) -> list:
    with context.request_scope(tenant_id=TENANT):
        return [event async for event in executor.run(request)]


def budget_checks(metrics_port: int) -> dict[str, float]:
    """trellis_budget_checks_total by outcome, as the process's /metrics serves it."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "trellis_budget_checks"
        for sample in family.samples
        if sample.name == "trellis_budget_checks_total"
    }


async def wait_until(predicate, what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, f"{what} not within {within:g}s"
        await asyncio.sleep(0.2)


async def test_with_cost_accounting_down_runs_go_ahead_and_their_usage_arrives_once(
    process_stack, channels, tmp_path: Path
) -> None:
    tools = tmp_path / "tools.yaml"
    tools.write_text(TOOLS_FILE)
    stack = await process_stack(per_service={"toolgateway": {"TRELLIS_TOOLS_FILE": str(tools)}})
    executor = ExecutorClient(channels.get(stack.executor_target), timeout=60)
    stack.processes["costs"].stop()

    explicit = await run(executor, executor_pb2.RunRequest(run_id="free", plan=echo_plan("a", "b")))
    goal = await run(executor, executor_pb2.RunRequest(run_id="goal", goal=GOAL))
    assert explicit[-1].finished.status == SUCCEEDED
    assert goal[-1].finished.status == SUCCEEDED
    executed = {
        run_id: sorted(
            e.node_finished.outcome.node_id
            for e in events
            if e.WhichOneof("event") == "node_finished" and e.node_finished.outcome.attempts > 0
        )
        for run_id, events in (("free", explicit), ("goal", goal))
    }
    assert executed == {"free": ["a", "b"], "goal": ["n1", "n2"]}
    # Each service went ahead without an answer: the executor once per run, the
    # planner once per model call (the plan and the join).
    assert budget_checks(stack.metrics_ports["executor"]).get("unavailable_allowed") == 2
    assert budget_checks(stack.metrics_ports["planner"]).get("unavailable_allowed") == 2

    await stack.restart("costs")
    costs = CostsClient(channels.get(stack.target("costs")))

    async def ledger(run_id: str) -> costs_pb2.GetRunUsageResponse:
        with context.request_scope(tenant_id=TENANT):
            return await costs.get_run_usage(run_id)

    expected = {"free": 2, "goal": 4}  # a row per tool execution, and per model call

    async def arrived() -> bool:
        counts = {r: len((await ledger(r)).usage_ids) for r in expected}
        return all(counts[r] >= n for r, n in expected.items())

    await wait_until(arrived, "the outboxes' usage in the ledger")
    await asyncio.sleep(1.0)  # and nothing more arrives afterwards
    for run_id, nodes in executed.items():
        usage = await ledger(run_id)
        tool_rows = sorted(u.split("/")[1] for u in usage.usage_ids if "/tool/" in u)
        assert tool_rows == nodes, run_id  # each execution once
        model_rows = sorted(u for u in usage.usage_ids if "/tool/" not in u)
        assert model_rows == ([] if run_id == "free" else ["goal/join/0", "goal/plan/0"])
    free, paid = await ledger("free"), await ledger("goal")
    assert (free.cost_nano_usd, free.model_usage.input_tokens) == (0, 0)
    assert paid.tool_cost_nano_usd == 1_000  # the arithmetic node; echo is free
    assert paid.model_usage.input_tokens > 0 and not paid.model_usage.estimated
    assert paid.cost_nano_usd == paid.model_usage.cost_nano_usd + 1_000


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says anything (a hung peer)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


async def test_a_hanging_cost_accounting_delays_a_run_by_about_the_check_timeout(
    process_stack, channels, silent_port: int
) -> None:
    hung = {"TRELLIS_COSTS_TARGET": f"127.0.0.1:{silent_port}"}
    stack = await process_stack(per_service={"executor": hung})
    executor = ExecutorClient(channels.get(stack.executor_target), timeout=60)
    request = executor_pb2.RunRequest(plan=echo_plan("a"))
    started = time.monotonic()
    with context.request_scope(tenant_id=TENANT):
        async for event in executor.run(request):
            if event.WhichOneof("event") == "started":
                waited = time.monotonic() - started
            last = event
    assert last.finished.status == SUCCEEDED
    # The check gives up after TRELLIS_BUDGET_CHECK_TIMEOUT_SECONDS (1 s), not after the
    # 30 s call timeout; the margin is for a loaded machine.
    assert 1.0 <= waited < 4.0
    assert budget_checks(stack.metrics_ports["executor"]) == {"unavailable_allowed": 1.0}


async def test_failing_closed_refuses_the_run_before_it_is_stored(tmp_path: Path, channels) -> None:
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/trellis.db", budget_fail_open=False
    )
    try:
        executor = ExecutorClient(channels.get(stack.executor_target), timeout=30)
        await stack.servers["costs"].stop()
        with pytest.raises(Unavailable) as raised:
            await run(executor, executor_pb2.RunRequest(run_id="closed", plan=echo_plan("a")))
        assert raised.value.reason == "BUDGET_UNAVAILABLE"
        with context.request_scope(tenant_id=TENANT), pytest.raises(NotFound):
            await executor.get_run("closed")
    finally:
        await stack.stop()


async def test_an_over_budget_run_is_refused_naming_the_limit_hit(
    stack, executor, channels
) -> None:
    costs = CostsClient(channels.get(stack.target("costs")))
    with context.request_scope(tenant_id=TENANT):
        await costs.record_usage(
            costs_pb2.RecordUsageRequest(
                usage_id="spent", kind=costs_pb2.USAGE_KIND_TOOL, tool="t", tool_cost_nano_usd=50
            )
        )
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(daily_limit_nano_usd=10**9, monthly_limit_nano_usd=50)
        )
    with pytest.raises(ResourceExhausted) as raised:
        await run(executor, executor_pb2.RunRequest(plan=echo_plan("a")))
    error = raised.value
    assert error.reason == "BUDGET_EXCEEDED"
    assert error.message == f"tenant {TENANT} is over its monthly budget; no run started"
    assert (error.metadata["limit"], error.metadata["limit_nano_usd"]) == ("monthly", "50")
