"""A real Prometheus scrapes the five services (as processes) during real runs.

The stack runs the demo goal twice for one tenant (the second run is answered from the
tool cache); Prometheus scrapes every service's /metrics each second. Read back through
Prometheus's HTTP API, the cost and token counters must equal the ledger's totals
(GetUsage), the budget gauge must equal limit - spent, every metric the deployment's
dashboard and alerts rely on must exist with its labels, and every PromQL expression of
deploy/grafana and deploy/prometheus must be accepted by this Prometheus and (for the
dashboard) show data. The repo's alert rules are loaded too: they must evaluate cleanly
and none may fire on a healthy stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the fixtures' types (tests/conftest.py)
    from conftest import PrometheusServer, StartPrometheus, StartStack

import asyncio
import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from trellis.clients.costs import CostsClient
from trellis.clients.executor import ExecutorClient
from trellis.costs.v1 import costs_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis_cli.app import DEMO_GOAL

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dashboards/trellis.json"
ALERT_RULES = REPO / "deploy/prometheus/rules/trellis-alerts.yml"

TENANT = "acme"
#: A daily budget far above what two demo runs cost, so no budget alert has cause to fire.
DAILY_LIMIT_NANO_USD = 5_000_000_000  # 5 USD
JOBS = ("executor", "planner", "toolgateway", "cache", "costs")
#: Grafana's variables, as the dashboard's "All" choice and a fixed window resolve them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$tenant": ".*",
    "$model": ".*",
    "$tool": ".*",
}


def close(a: float, b: float) -> bool:
    """Equal to float precision (Prometheus sums floats; the ledger sums integers)."""
    return a == pytest.approx(b, rel=1e-9, abs=1e-12)


def values_by(result: list[dict], *labels: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(series["metric"].get(label, "") for label in labels): float(series["value"][1])
        for series in result
    }


async def run_goal(executor: ExecutorClient) -> list[executor_pb2.RunResponse]:
    """The demo goal's events; it must succeed."""
    events = [event async for event in executor.run(executor_pb2.RunRequest(goal=DEMO_GOAL))]
    assert events and events[-1].WhichOneof("event") == "finished", events
    finished = events[-1].finished
    assert finished.status == executor_pb2.RUN_STATUS_SUCCEEDED, finished.error
    return events


def executions(events: list[executor_pb2.RunResponse]) -> int:
    """Tool calls of a run that reached a backend (cache hits ran nothing)."""
    finished = [e.node_finished.outcome for e in events if e.WhichOneof("event") == "node_finished"]
    return sum(1 for outcome in finished if outcome.attempts > 0 and not outcome.cache_hit)


async def settled_usage(
    costs: CostsClient, *, cost_nano_usd: int, tool_executions: int, within: float = 15.0
) -> costs_pb2.GetUsageResponse:
    """GetUsage once the ledger holds the runs' cost and a row for each tool execution."""
    deadline = time.monotonic() + within
    while True:
        usage = await costs.get_usage()
        tool_events = sum(row.events for row in usage.rows if _is_tool_row(row))
        if usage.total_cost_nano_usd == cost_nano_usd and tool_events == tool_executions:
            return usage
        if time.monotonic() > deadline:
            pytest.fail(
                f"ledger never reached cost {cost_nano_usd} with {tool_executions} tool "
                f"executions: {usage}"
            )
        await asyncio.sleep(0.1)


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables resolved) of every dashboard target."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unresolved variable in {panel['title']!r}: {expr}"
            found.append((panel["title"], expr))
    return found


def variable_queries() -> list[tuple[str, str]]:
    """The template variables' ``label_values(metric, label)`` as PromQL ``group by``."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else ""
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        found.append((variable["name"], f"group by ({match[2]}) ({match[1]})"))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERT_RULES.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


async def test_prometheus_sees_ledger_costs_tokens_and_every_listed_metric(
    process_stack: StartStack, prometheus_server: StartPrometheus, channels, tmp_path: Path
) -> None:
    per_service = {
        "costs": {"TRELLIS_METRICS_TENANT_LABEL": "true"},
        # Outboxes of this test's own: the default (.trellis/ in the working directory)
        # is shared with every other process started there and would redeliver their
        # undelivered usage into this ledger.
        **{
            name: {"TRELLIS_OUTBOX_PATH": str(tmp_path / f"{name}-outbox.db")}
            for name in ("planner", "toolgateway")
        },
    }
    stack = await process_stack(per_service=per_service)
    prom: PrometheusServer = await prometheus_server(
        {name: [f"127.0.0.1:{port}"] for name, port in stack.metrics_ports.items()},
        rule_files=[ALERT_RULES],
    )
    up = await prom.wait_for("up", lambda r: len(r) == len(JOBS) and all(_v(s) == 1 for s in r))
    assert sorted(s["metric"]["job"] for s in up) == sorted(JOBS)

    costs = CostsClient(channels.get(stack.target("costs")))
    executor = ExecutorClient(channels.get(stack.executor_target))
    with context.request_scope(tenant_id=TENANT):
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(tenant_id=TENANT, daily_limit_nano_usd=DAILY_LIMIT_NANO_USD)
        )
        first_events = await run_goal(executor)
        second_events = await run_goal(executor)
        first, second = first_events[-1].finished, second_events[-1].finished
        # Tool executions reach the ledger in the background (the gateway's outbox):
        # wait for every row the two runs paid for before reading the totals.
        usage = await settled_usage(
            costs,
            cost_nano_usd=first.cost_nano_usd + second.cost_nano_usd,
            tool_executions=executions(first_events) + executions(second_events),
        )
        budget = await costs.check_budget()
    # Everything above is in the services' metrics now; wait for a scrape of every job
    # that began after this moment, so each query below sees the final values.
    settled = time.time()
    await prom.wait_for("min(timestamp(up))", lambda r: bool(r) and _v(r[0]) > settled, within=15)
    assert second.cache_hits > 0, "the second run should be answered from the tool cache"
    assert usage.total_cost_nano_usd > 0
    total_usd = usage.total_cost_nano_usd / 1e9

    # -- cost and tokens: Prometheus's view equals the ledger's -----------------------
    assert close(await prom.value("sum(trellis_cost_usd_total)"), total_usd)
    model_rows = [row for row in usage.rows if not _is_tool_row(row)]
    assert model_rows, usage
    ledger_by_model: dict[str, float] = {}
    for row in model_rows:
        ledger_by_model[row.model] = ledger_by_model.get(row.model, 0) + row.cost_nano_usd / 1e9
    by_model = values_by(
        await prom.query('sum by (model) (trellis_cost_usd_total{kind="model"})'), "model"
    )
    assert by_model.keys() == {(m,) for m in ledger_by_model}, (by_model, ledger_by_model)
    for model, usd in ledger_by_model.items():
        assert close(by_model[(model,)], usd), (model, by_model[(model,)], usd)

    ledger_tokens = {
        "input": sum(row.input_tokens for row in model_rows),
        "output": sum(row.output_tokens for row in model_rows),
        "cached_input": sum(row.cached_input_tokens for row in model_rows),
    }
    assert ledger_tokens["input"] > 0 and ledger_tokens["output"] > 0
    tokens = values_by(await prom.query("sum by (type) (trellis_tokens_total)"), "type")
    assert tokens == {(kind,): float(n) for kind, n in ledger_tokens.items()}
    # The planner's own GenAI histograms saw the same tokens the ledger priced.
    genai = values_by(
        await prom.query("sum by (gen_ai_token_type) (gen_ai_client_token_usage_sum)"),
        "gen_ai_token_type",
    )
    assert genai == {("input",): ledger_tokens["input"], ("output",): ledger_tokens["output"]}

    # Tenant is a label of cost and tokens because cost accounting was told so.
    by_tenant = values_by(await prom.query("sum by (tenant) (trellis_cost_usd_total)"), "tenant")
    assert by_tenant.keys() == {(TENANT,)} and close(by_tenant[(TENANT,)], total_usd)
    token_tenants = await prom.query("sum by (tenant) (trellis_tokens_total)")
    assert [s["metric"].get("tenant") for s in token_tenants] == [TENANT]

    # -- budget gauge: limit - spent ----------------------------------------------------
    assert budget.remaining_nano_usd == DAILY_LIMIT_NANO_USD - usage.total_cost_nano_usd
    remaining_usd = budget.remaining_nano_usd / 1e9
    gauge = await prom.query(f'trellis_budget_remaining_usd{{tenant="{TENANT}"}}')
    assert len(gauge) == 1 and gauge[0]["metric"]["job"] == "costs", gauge
    assert close(_v(gauge[0]), remaining_usd), (gauge, remaining_usd)

    # -- the rest of the listed metrics, with their labels, from the right service ----
    calls = await prom.query('trellis_tool_calls_total{cache="hit"} > 0')
    assert calls, "no tool call was answered from the cache"
    assert {s["metric"]["job"] for s in calls} == {"toolgateway"}
    all_calls = await prom.query("trellis_tool_calls_total")
    assert all({"tool", "outcome", "cache"} <= s["metric"].keys() for s in all_calls)
    assert {s["metric"]["outcome"] for s in all_calls} == {"succeeded"}
    assert {s["metric"]["cache"] for s in all_calls} >= {"hit", "miss"}

    cache = values_by(
        await prom.query('sum by (job, result) (trellis_cache_requests_total{result=~"hit|miss"})'),
        "job",
        "result",
    )
    assert cache.get(("cache", "hit"), 0) >= second.cache_hits > 0, cache
    assert cache.get(("cache", "miss"), 0) > 0, cache

    tool_seconds = await prom.query("sum by (job, tool) (trellis_tool_duration_seconds_count)")
    assert {s["metric"]["job"] for s in tool_seconds} == {"toolgateway"}
    assert sum(_v(s) for s in tool_seconds) == sum(_v(s) for s in all_calls)
    assert await prom.query('trellis_tool_duration_seconds_bucket{le="+Inf"}')

    runs = values_by(
        await prom.query("sum by (job, status) (trellis_run_duration_seconds_count)"),
        "job",
        "status",
    )
    assert runs == {("executor", "succeeded"): 2.0}
    assert await prom.query('trellis_run_duration_seconds_bucket{status="succeeded"}')

    for histogram in ("gen_ai_client_token_usage", "gen_ai_client_operation_duration_seconds"):
        buckets = await prom.query(f"{histogram}_bucket")
        assert buckets, f"{histogram} is not exported"
        assert {s["metric"]["job"] for s in buckets} == {"planner"}
        assert all(s["metric"].get("gen_ai_request_model") for s in buckets)
        assert all(s["metric"].get("gen_ai_operation_name") for s in buckets)

    # -- the deploy assets' PromQL runs against this live Prometheus -------------------
    # rate() and increase() need two samples of a series: wait for a second scrape.
    await prom.wait_for(
        "min(timestamp(up))", lambda r: bool(r) and _v(r[0]) > settled + 1.5, within=15
    )
    for title, expr in dashboard_expressions():
        result = await prom.query(expr)  # fails the test if Prometheus refuses it
        assert result, f"dashboard panel {title!r} shows no data: {expr}"
    for name, expr in variable_queries():
        assert await prom.query(expr), f"dashboard variable ${name} offers no values: {expr}"
    tenants = values_by(await prom.query(dict(variable_queries())["tenant"]), "tenant")
    assert (TENANT,) in tenants
    for _alert, expr in alert_expressions():
        await prom.query(expr)  # accepted; a healthy stack gives it nothing to fire on

    # The rule file loaded into this Prometheus evaluates cleanly and stays quiet.
    rules = await prom.http.get("/api/v1/rules")
    groups = rules.json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert loaded.keys() == {alert for alert, _ in alert_expressions()}
    evaluated = await _wait_rules_evaluated(prom, after=settled + 1.5)
    for rule in evaluated:
        assert rule["health"] == "ok", rule
        assert rule["state"] == "inactive", rule
    assert (await prom.http.get("/api/v1/alerts")).json()["data"]["alerts"] == []


async def _wait_rules_evaluated(
    prom: PrometheusServer, after: float, within: float = 10.0
) -> list[dict]:
    """The alerting rules once each has been evaluated since ``after`` (a Unix time)."""
    deadline = time.monotonic() + within
    while True:
        groups = (await prom.http.get("/api/v1/rules")).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(_evaluated_after(rule, after) for rule in rules):
            return rules
        if time.monotonic() > deadline:
            pytest.fail(f"alert rules not evaluated within {within:g}s: {rules}")
        await asyncio.sleep(0.25)


def _v(series: dict) -> float:
    return float(series["value"][1])


def _is_tool_row(row: costs_pb2.UsageRow) -> bool:
    """Tool rows: kind TOOL, or (before UsageRow had kind/tool) a ``tool:`` model prefix."""
    return row.kind == costs_pb2.USAGE_KIND_TOOL or bool(row.tool) or row.model.startswith("tool:")


def _evaluated_after(rule: dict, after: float) -> bool:
    stamp = rule.get("lastEvaluation", "")
    if rule.get("health") == "unknown" or stamp.startswith("0001-"):
        return False
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() > after
