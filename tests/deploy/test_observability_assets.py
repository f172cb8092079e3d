"""The observability deploy assets are valid and agree with the code.

deploy/prometheus passes promtool (config, rules and the rules' unit tests); the Grafana
dashboard parses, has the panels the deployment promises, and every metric and label its
PromQL (and the alert rules') names is one libs/trellis/runtime/metrics.py defines; the
scrape jobs are the services' default metrics ports; the provisioning files point at
the datasource and the folder the dashboard uses.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import trellis.runtime.metrics as trellis_metrics
from trellis_cache.settings import CacheSettings
from trellis_costs.settings import CostsSettings
from trellis_executor.settings import ExecutorSettings
from trellis_planner.settings import PlannerSettings
from trellis_toolgateway.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy/prometheus"
GRAFANA = REPO / "deploy/grafana"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "rules/trellis-alerts.yml"
RULE_TESTS = PROMETHEUS / "tests/trellis-alerts.test.yml"
DASHBOARD = GRAFANA / "dashboards/trellis.json"
DATASOURCES = GRAFANA / "provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning/dashboards/trellis.yml"

#: Scrape job (the compose service name) -> the settings whose default metrics port it uses.
SERVICES = {
    "executor": ExecutorSettings,
    "planner": PlannerSettings,
    "toolgateway": GatewaySettings,
    "cache": CacheSettings,
    "costs": CostsSettings,
}
#: Labels Prometheus adds to every scraped series, and its own ``up``.
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHETIC = {"up": TARGET_LABELS, "ALERTS": TARGET_LABELS | {"alertname", "alertstate"}}
#: The metrics the issue lists; the dashboard must show each of them.
LISTED_METRICS = {
    "trellis_cost_usd_total",
    "trellis_tokens_total",
    "trellis_budget_remaining_usd",
    "trellis_tool_calls_total",
    "trellis_tool_duration_seconds_bucket",
    "trellis_run_duration_seconds_bucket",
    "trellis_cache_requests_total",
    "gen_ai_client_operation_duration_seconds_bucket",
    "gen_ai_client_token_usage_sum",
}


# -- what the code exports --------------------------------------------------------------


def defined_series() -> dict[str, frozenset[str]]:
    """Every series name the code can export -> the labels it may carry.

    Read from the collectors trellis.runtime.metrics registers in prometheus_client's
    default REGISTRY, with the suffixes the exposition format adds: counters ``_total``,
    histograms ``_bucket`` (plus label ``le``), ``_sum`` and ``_count``.
    """
    registered = {
        metric
        for metric in vars(trellis_metrics).values()
        if isinstance(metric, MetricWrapperBase)
        and REGISTRY._collector_to_names.get(metric)  # registered, not a stray instance
    }
    assert registered, "trellis.runtime.metrics defines no metric"
    series: dict[str, frozenset[str]] = dict(SYNTHETIC)
    for metric in registered:
        name, kind = metric._name, metric._type
        labels = frozenset(metric._labelnames) | TARGET_LABELS
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


# -- reading PromQL well enough to name its series and labels ---------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NUMBER = re.compile(r"(?<![\w:.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?(?![\w:])")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan",
}  # fmt: skip


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(series name, label names its matchers use) of every vector selector in ``expr``."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    found = []
    for match in re.finditer(rf"({_IDENT.pattern})?\s*(\{{[^}}]*\}})?", text):
        name, matchers = match.group(1), match.group(2)
        if not name and not matchers:
            continue
        rest = text[match.end() :].lstrip()
        if name and not matchers and (rest.startswith("(") or name.lower() in _KEYWORDS):
            continue  # a function call or an operator keyword
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
        if not name:  # {__name__="..."} selects by name
            raise AssertionError(f"name the metric outside the braces: {expr}")
        found.append((name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    """Labels of ``by (...)``/``without (...)``/``on (...)`` clauses in ``expr``."""
    text = _STRING.sub('""', expr)
    return {
        label.strip()
        for _, labels in _GROUPING.findall(text)
        for label in labels.split(",")
        if label.strip()
    }


def check_expression(where: str, expr: str, series: dict[str, frozenset[str]]) -> set[str]:
    """Assert each series and label ``expr`` uses is one the code exports; return names."""
    used = selectors(expr)
    assert used, f"{where}: no series in {expr!r}"
    names = set()
    for name, labels in used:
        assert name in series, f"{where}: {name} is not a metric the code defines ({expr})"
        unknown = labels - series[name]
        assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)} ({expr})"
        names.add(name)
    available = set().union(*(series[name] for name in names))
    unknown = grouping_labels(expr) - available
    assert not unknown, f"{where}: grouping by unknown label(s) {sorted(unknown)} ({expr})"
    return names


def test_the_promql_reader_finds_series_and_labels() -> None:
    """The checks below are only as good as this reader: it must see through PromQL."""
    expr = (
        "histogram_quantile(0.95, sum by (le, tool) (rate(trellis_tool_duration_seconds_bucket"
        '{tool=~"$tool", x!="a{b}"}[5m]))) / on (tool) group_left sum(rate(other_total[1m]))'
        " > 1/60 and up == 0 or vector(1e9)"
    )
    assert selectors(expr) == [
        ("trellis_tool_duration_seconds_bucket", {"tool", "x"}),
        ("other_total", set()),
        ("up", set()),
    ]
    assert grouping_labels(expr) == {"le", "tool"}
    series = defined_series()
    assert check_expression("example", "up == 0", series) == {"up"}
    with pytest.raises(AssertionError, match="other_total is not a metric"):
        check_expression("example", "rate(other_total[1m]) / trellis_cache_requests_total", series)
    with pytest.raises(AssertionError, match=r"no label\(s\) \['x'\]"):
        check_expression("example", expr.replace("other_total", "up"), series)
    with pytest.raises(AssertionError, match=r"no label\(s\) \['model'\]"):
        check_expression("example", 'sum(trellis_cache_requests_total{model="m"})', series)
    with pytest.raises(AssertionError, match="grouping by unknown"):
        check_expression("example", "sum by (model) (trellis_cache_requests_total)", series)


def test_defined_series_follow_the_exposition_suffixes() -> None:
    series = defined_series()
    assert {"tool", "outcome", "cache"} <= series["trellis_tool_calls_total"]
    assert "le" in series["trellis_run_duration_seconds_bucket"]
    assert "status" in series["trellis_run_duration_seconds_count"]
    assert "trellis_tool_calls" not in series and "trellis_budget_remaining_usd" in series
    assert "gen_ai_token_type" in series["gen_ai_client_token_usage_bucket"]


# -- promtool ---------------------------------------------------------------------------


def promtool(*args: str) -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed (`make system-deps`, or apt-get install prometheus)")
    done = subprocess.run(
        [binary, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_accepts_the_scrape_config_and_its_rule_file() -> None:
    output = promtool("check", "config", str(CONFIG.relative_to(REPO)))
    assert "1 rule files found" in output and "SUCCESS: 5 rules found" in output


def test_promtool_accepts_the_alert_rules() -> None:
    assert "SUCCESS" in promtool("check", "rules", str(RULES.relative_to(REPO)))


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS.relative_to(REPO)))


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fired == alerts, f"alerts never shown firing: {sorted(alerts - fired)}"
    assert quiet == alerts, f"alerts never shown quiet: {sorted(alerts - quiet)}"


# -- prometheus.yml ---------------------------------------------------------------------


def test_scrape_jobs_are_the_five_services_on_their_default_metrics_ports() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    for job, settings in SERVICES.items():
        port = settings.model_fields["metrics_port"].default
        assert jobs.get(job) == [f"{job}:{port}"], (job, jobs.get(job))
    assert set(jobs) - set(SERVICES) <= {"prometheus"}
    assert config["rule_files"] == ["rules/trellis-alerts.yml"]
    assert (CONFIG.parent / config["rule_files"][0]).is_file()


# -- alert rules ------------------------------------------------------------------------


def test_alert_rules_use_only_defined_metrics_and_carry_severity_and_text() -> None:
    series = defined_series()
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used: set[str] = set()
    for rule in rules:
        where = f"alert {rule['alert']}"
        used |= check_expression(where, rule["expr"], series)
        assert rule["labels"]["severity"] in {"critical", "warning"}, where
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], where
    assert {
        "trellis_budget_remaining_usd",
        "trellis_tool_calls_total",
        "trellis_run_duration_seconds_count",
        "up",
    } <= used
    exprs = {rule["alert"]: rule["expr"] for rule in rules}
    assert "trellis_budget_remaining_usd <= 0" in exprs["TrellisBudgetExhausted"]
    assert 'status="failed"' in exprs["TrellisRunFailureRateHigh"]
    assert "up{" in exprs["TrellisServiceDown"] and "== 0" in exprs["TrellisServiceDown"]
    jobs = re.search(r'job=~"([^"]+)"', exprs["TrellisServiceDown"])
    assert jobs and set(jobs[1].split("|")) == set(SERVICES)


# -- Grafana ----------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict) -> list[dict]:
    panels, found = list(board["panels"]), []
    while panels:
        panel = panels.pop(0)
        found.append(panel)
        panels.extend(panel.get("panels", []))
    return found


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    panels = all_panels(board)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_queries_use_only_defined_metrics_and_labels() -> None:
    series = defined_series()
    board = dashboard()
    used: set[str] = set()
    for panel in all_panels(board):
        for target in panel.get("targets", []):
            used |= check_expression(f"panel {panel['title']!r}", target["expr"], series)
    for variable in board["templating"]["list"]:
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: {query!r}"
        assert match[1] in series, f"variable {variable['name']}: unknown {match[1]}"
        assert match[2] in series[match[1]], f"variable {variable['name']}: no label {match[2]}"
    assert used >= LISTED_METRICS, f"not on the dashboard: {sorted(LISTED_METRICS - used)}"


#: (what, series, what one panel's expressions must all contain).
REQUIRED_PANELS = [
    ("spend rate by model", "trellis_cost_usd_total", ["by (model)", "rate("]),
    ("spend rate by tenant", "trellis_cost_usd_total", ["by (tenant)", "rate("]),
    ("spend total by model", "trellis_cost_usd_total", ["by (model)", "increase("]),
    ("spend total by tenant", "trellis_cost_usd_total", ["by (tenant)", "increase("]),
    ("tokens by model and type", "trellis_tokens_total", ["by (model, type)"]),
    ("cache hit ratio", "trellis_cache_requests_total", ['result="hit"', " / "]),
    (
        "tool latency p50/p95",
        "trellis_tool_duration_seconds_bucket",
        ["histogram_quantile(0.5,", "histogram_quantile(0.95,"],
    ),
    (
        "run latency p50/p95",
        "trellis_run_duration_seconds_bucket",
        ["histogram_quantile(0.5,", "histogram_quantile(0.95,"],
    ),
    ("runs by status", "trellis_run_duration_seconds_count", ["by (status)"]),
    (
        "GenAI operation duration",
        "gen_ai_client_operation_duration_seconds_bucket",
        ["histogram_quantile(0.95,"],
    ),
    ("budget remaining", "trellis_budget_remaining_usd", ["by (tenant)"]),
]


@pytest.mark.parametrize(
    ("what", "metric", "needles"), REQUIRED_PANELS, ids=[r[0] for r in REQUIRED_PANELS]
)
def test_dashboard_has_the_promised_panel(what: str, metric: str, needles: list[str]) -> None:
    for panel in all_panels(dashboard()):
        text = " ".join(target["expr"] for target in panel.get("targets", []))
        if metric in text and all(needle in text for needle in needles):
            return
    pytest.fail(f"no panel shows {what} ({metric} with {needles})")


def test_dashboard_filters_by_tenant_and_model_variables() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"tenant", "model"} <= variables.keys()
    for name in ("tenant", "model"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    exprs = [t["expr"] for p in all_panels(board) for t in p.get("targets", [])]
    cost_exprs = [e for e in exprs if "trellis_cost_usd_total" in e]
    assert cost_exprs and all('tenant=~"$tenant"' in e for e in cost_exprs)
    assert any('model=~"$model"' in e for e in exprs)
