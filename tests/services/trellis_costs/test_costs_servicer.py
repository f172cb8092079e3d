"""CostAccountingService over real gRPC: idempotent recording, reports, budgets,
tenants from metadata, contract errors and metrics (budget reservations under load are
in test_costs_reservations.py).

(Named test_costs_servicer.py: pytest's default import mode needs unique basenames.)
"""

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from prometheus_client import REGISTRY

from trellis.clients.costs import CostsClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime.context import request_scope
from trellis.runtime.convert import timestamp
from trellis.runtime.errors import AlreadyExists, InvalidArgument
from trellis_costs.service import NAME, build
from trellis_costs.settings import CostsSettings

MODEL = costs_pb2.USAGE_KIND_MODEL
TOOL = costs_pb2.USAGE_KIND_TOOL
# gpt-4o-mini: 150 nano-USD per input token, 600 per output token.
MINI_1000_100 = 1_000 * 150 + 100 * 600


def settings(tmp_path: Path, **overrides: object) -> CostsSettings:
    return CostsSettings(
        port=0, metrics_port=0, database_url=f"sqlite:///{tmp_path}/costs.db", **overrides
    )


@pytest.fixture
async def costs(serve, channels, tmp_path: Path) -> CostsClient:
    server = await serve(NAME, build, settings(tmp_path))
    return CostsClient(channels.get(server.target))


def model_usage(
    usage_id: str,
    model: str = "gpt-4o-mini",
    input_tokens: int = 1_000,
    output_tokens: int = 100,
    cached: int = 0,
    **kw: object,
) -> costs_pb2.RecordUsageRequest:
    usage = common_pb2.Usage(
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
    )
    return costs_pb2.RecordUsageRequest(usage_id=usage_id, kind=MODEL, usage=usage, **kw)


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_record_twice_is_one_event_with_the_same_cost(costs: CostsClient) -> None:
    first = await costs.record_usage(model_usage("run1/n1", run_id="run1", node_id="n1"))
    assert (first.cost_nano_usd, first.duplicate) == (MINI_1000_100, False)
    again = await costs.record_usage(model_usage("run1/n1", input_tokens=5))
    assert (again.cost_nano_usd, again.duplicate) == (MINI_1000_100, True)

    report = await costs.get_usage()
    assert [(r.model, r.day, r.input_tokens, r.events) for r in report.rows] == [
        ("gpt-4o-mini", today(), 1_000, 1)
    ]
    assert report.total_cost_nano_usd == MINI_1000_100


async def test_get_usage_totals_models_and_tools_over_a_window(costs: CostsClient) -> None:
    march_1 = timestamp(datetime(2025, 3, 1, 10, tzinfo=UTC))
    march_2 = timestamp(datetime(2025, 3, 2, 10, tzinfo=UTC))
    await costs.record_usage(model_usage("a", occurred_at=march_1))
    await costs.record_usage(model_usage("b", occurred_at=march_2, cached=400))
    await costs.record_usage(model_usage("c", model="gpt-4o", occurred_at=march_2))
    tool = costs_pb2.RecordUsageRequest(
        usage_id="d", kind=TOOL, tool="web_search", tool_cost_nano_usd=3_000, occurred_at=march_2
    )
    assert (await costs.record_usage(tool)).cost_nano_usd == 3_000
    await costs.record_usage(model_usage("e"))  # today: outside the window

    report = await costs.get_usage(start_day="2025-03-01", end_day="2025-03-02")
    cached = 600 * 150 + 400 * 75 + 100 * 600
    gpt4o = 1_000 * 2_500 + 100 * 10_000
    assert [
        (r.tenant_id, r.day, r.kind, r.model, r.tool, r.cached_input_tokens, r.cost_nano_usd)
        for r in report.rows
    ] == [
        ("default", "2025-03-01", MODEL, "gpt-4o-mini", "", 0, MINI_1000_100),
        ("default", "2025-03-02", MODEL, "gpt-4o", "", 0, gpt4o),
        ("default", "2025-03-02", MODEL, "gpt-4o-mini", "", 400, cached),
        ("default", "2025-03-02", TOOL, "", "web_search", 0, 3_000),
    ]
    assert report.total_cost_nano_usd == MINI_1000_100 + gpt4o + cached + 3_000

    only_first = await costs.get_usage(start_day="2025-03-01", end_day="2025-03-01")
    assert only_first.total_cost_nano_usd == MINI_1000_100


async def test_get_usage_shows_estimated_events_per_row_and_in_total(costs: CostsClient) -> None:
    await costs.record_usage(model_usage("exact"))
    await costs.record_usage(model_usage("cut", input_tokens=300, output_tokens=40, estimated=True))
    tool = costs_pb2.RecordUsageRequest(usage_id="t", kind=TOOL, tool="echo", tool_cost_nano_usd=1)
    await costs.record_usage(tool)
    report = await costs.get_usage()
    assert [
        (
            r.model or r.tool,
            r.events,
            r.estimated_events,
            r.estimated_input_tokens,
            r.estimated_output_tokens,
        )
        for r in report.rows
    ] == [("gpt-4o-mini", 2, 1, 300, 40), ("echo", 1, 0, 0, 0)]
    assert (report.total_input_tokens, report.total_output_tokens, report.estimated_events) == (
        1_300,
        140,
        1,
    )


async def test_get_run_usage_is_the_ledger_of_one_run_of_the_callers_tenant(
    costs: CostsClient,
) -> None:
    with request_scope(tenant_id="acme"):
        await costs.record_usage(model_usage("r1/plan/0", run_id="r1", cached=200))
        tool = costs_pb2.RecordUsageRequest(
            usage_id="r1/n1/tool/x", run_id="r1", kind=TOOL, tool="echo", tool_cost_nano_usd=700
        )
        await costs.record_usage(tool)
        await costs.record_usage(
            model_usage("r1/join/0", run_id="r1", input_tokens=10, output_tokens=5, estimated=True)
        )
        await costs.record_usage(model_usage("r2/plan/0", run_id="r2"))
        run = await costs.get_run_usage("r1")
    plan = 800 * 150 + 200 * 75 + 100 * 600
    join = 10 * 150 + 5 * 600
    assert run.model_usage == common_pb2.Usage(
        model="gpt-4o-mini",
        input_tokens=1_010,
        output_tokens=105,
        cached_input_tokens=200,
        cost_nano_usd=plan + join,
        estimated=True,
    )
    assert (run.tool_cost_nano_usd, run.cost_nano_usd) == (700, plan + join + 700)
    assert sorted(run.usage_ids) == ["r1/join/0", "r1/n1/tool/x", "r1/plan/0"]
    # Another tenant asking for the run gets nothing back, not an error.
    with request_scope(tenant_id="intruder"):
        assert await costs.get_run_usage("r1") == costs_pb2.GetRunUsageResponse()
    with pytest.raises(InvalidArgument) as raised:
        await costs.get_run_usage("")
    assert raised.value.reason == "RUN_ID_REQUIRED"
    assert [v.field for v in raised.value.violations] == ["run_id"]


async def test_tenant_comes_from_metadata(costs: CostsClient) -> None:
    with request_scope(tenant_id="acme"):
        await costs.record_usage(model_usage("u1"))
        mine = await costs.get_usage()
    assert [r.tenant_id for r in mine.rows] == ["acme"]
    assert (await costs.get_usage()).rows == []  # the default tenant spent nothing
    theirs = await costs.get_usage(tenant_id="acme")
    assert theirs.total_cost_nano_usd == MINI_1000_100


async def test_budget_round_trip_per_tenant(costs: CostsClient) -> None:
    unlimited = await costs.check_budget(10**12)
    assert (unlimited.allowed, unlimited.daily_limit_nano_usd) == (True, 0)

    with request_scope(tenant_id="acme"):
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(
                daily_limit_nano_usd=MINI_1000_100 + 10, monthly_limit_nano_usd=10**9
            )
        )
        await costs.record_usage(model_usage("u1"))
        check = await costs.check_budget(10)
        assert (check.allowed, check.daily_limit_nano_usd, check.monthly_limit_nano_usd) == (
            True,
            MINI_1000_100 + 10,
            10**9,
        )
        assert (check.spent_today_nano_usd, check.spent_this_month_nano_usd) == (
            MINI_1000_100,
            MINI_1000_100,
        )
        assert (check.remaining_nano_usd, check.estimated_cost_nano_usd) == (10, 10)
        assert not (await costs.check_budget(11)).allowed
    assert (await costs.check_budget(10**12)).allowed  # another tenant is not limited

    # An explicit tenant_id sets another tenant's budget.
    await costs.set_budget(costs_pb2.SetBudgetRequest(tenant_id="acme", daily_limit_nano_usd=0))
    with request_scope(tenant_id="acme"):
        assert (await costs.check_budget(10**12)).allowed


async def test_set_budget_with_a_mask_changes_only_the_named_limits(costs: CostsClient) -> None:
    def masked(*paths: str, **limits: int) -> costs_pb2.SetBudgetRequest:
        return costs_pb2.SetBudgetRequest(update_mask=FieldMask(paths=paths), **limits)

    async def limits() -> tuple[int, int]:
        check = await costs.check_budget(0)
        return check.daily_limit_nano_usd, check.monthly_limit_nano_usd

    with request_scope(tenant_id="masked"):
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(daily_limit_nano_usd=10, monthly_limit_nano_usd=100)
        )
        # Only the monthly limit is named: the daily one stays (and its -1 is not looked at).
        await costs.set_budget(
            masked("monthly_limit_nano_usd", daily_limit_nano_usd=-1, monthly_limit_nano_usd=200)
        )
        assert await limits() == (10, 200)
        await costs.set_budget(masked("daily_limit_nano_usd"))  # 0: that limit goes
        assert await limits() == (0, 200)
        # An empty mask replaces both, as before masks existed.
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=5))
        assert await limits() == (5, 0)

        with pytest.raises(InvalidArgument) as raised:
            await costs.set_budget(
                masked("daily_limit_nano_usd", "weekly_limit", daily_limit_nano_usd=-3)
            )
        assert raised.value.reason == "INVALID_BUDGET"
        assert [v.field for v in raised.value.violations] == [
            "update_mask.paths[1]",
            "daily_limit_nano_usd",
        ]
        assert await limits() == (5, 0)  # nothing changed


async def test_estimated_usage_is_priced_and_added_to_the_estimate(costs: CostsClient) -> None:
    with request_scope(tenant_id="estimator"):
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=MINI_1000_100 + 5))
        usage = common_pb2.Usage(model="gpt-4o-mini", input_tokens=1_000, output_tokens=100)
        fits = await costs.check_budget(5, estimated_usage=usage)
        assert (fits.allowed, fits.estimated_cost_nano_usd) == (True, MINI_1000_100 + 5)
        too_much = await costs.check_budget(6, estimated_usage=usage, reservation_id="r1")
        assert (too_much.allowed, too_much.estimated_cost_nano_usd) == (False, MINI_1000_100 + 6)
        # An unknown model prices at 0: only the explicit part counts.
        unknown = common_pb2.Usage(model="mystery-7b", input_tokens=10**6)
        assert (await costs.check_budget(7, estimated_usage=unknown)).estimated_cost_nano_usd == 7


async def test_a_reservation_is_held_until_its_usage_is_recorded(costs: CostsClient) -> None:
    with request_scope(tenant_id="holder"):
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=10_000))
        held = await costs.check_budget(6_000, reservation_id="call-1")
        assert (held.allowed, held.reserved_nano_usd, held.remaining_nano_usd) == (
            True,
            0,
            10_000,
        )
        other = await costs.check_budget(6_000, reservation_id="call-2")
        assert (other.allowed, other.reserved_nano_usd, other.remaining_nano_usd) == (
            False,
            6_000,
            4_000,
        )
        tool = costs_pb2.RecordUsageRequest(
            usage_id="call-1", kind=TOOL, tool="t", tool_cost_nano_usd=1_000
        )
        await costs.record_usage(tool)
        settled = await costs.check_budget(6_000, reservation_id="call-2")
        assert (settled.allowed, settled.spent_today_nano_usd, settled.reserved_nano_usd) == (
            True,
            1_000,
            0,
        )


async def test_usage_id_of_another_tenant_is_already_exists(costs: CostsClient) -> None:
    with request_scope(tenant_id="first"):
        await costs.record_usage(model_usage("shared-id"))
    with request_scope(tenant_id="second"), pytest.raises(AlreadyExists) as raised:
        await costs.record_usage(model_usage("shared-id"))
    assert raised.value.reason == "USAGE_ID_TAKEN"
    assert (await costs.get_usage(tenant_id="second")).rows == []


async def test_missing_usage_id_is_invalid_argument(costs: CostsClient) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await costs.record_usage(model_usage(""))
    assert raised.value.reason == "USAGE_ID_REQUIRED"
    assert [v.field for v in raised.value.violations] == ["usage_id"]


async def test_model_call_without_model_and_negative_tokens_list_every_violation(
    costs: CostsClient,
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await costs.record_usage(model_usage("u1", model="", input_tokens=-1, output_tokens=-2))
    assert raised.value.reason == "INVALID_USAGE"
    assert [v.field for v in raised.value.violations] == [
        "usage.model",
        "usage.input_tokens",
        "usage.output_tokens",
    ]
    assert (await costs.get_usage()).rows == []  # nothing was recorded


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (costs_pb2.RecordUsageRequest(usage_id="u1"), "kind"),
        (costs_pb2.RecordUsageRequest(usage_id="u1", kind=TOOL), "tool"),
        (
            costs_pb2.RecordUsageRequest(usage_id="u1", kind=TOOL, tool="t", tool_cost_nano_usd=-1),
            "tool_cost_nano_usd",
        ),
        (model_usage("u1", input_tokens=10, cached=11), "usage.cached_input_tokens"),
    ],
)
async def test_contract_violations(
    costs: CostsClient, request_: costs_pb2.RecordUsageRequest, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await costs.record_usage(request_)
    assert raised.value.reason == "INVALID_USAGE"
    assert [v.field for v in raised.value.violations] == [field]


@pytest.mark.parametrize(
    ("start", "end", "fields"),
    [
        ("2025-13-01", "", ["start_day"]),
        ("yesterday", "20250101", ["start_day", "end_day"]),
        ("2025-03-02", "2025-03-01", ["end_day"]),
    ],
)
async def test_bad_days_are_invalid_argument(
    costs: CostsClient, start: str, end: str, fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await costs.get_usage(start_day=start, end_day=end)
    assert raised.value.reason == "INVALID_DAY"
    assert [v.field for v in raised.value.violations] == fields


async def test_negative_budget_and_estimate_are_invalid(costs: CostsClient) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await costs.set_budget(costs_pb2.SetBudgetRequest(monthly_limit_nano_usd=-1))
    assert raised.value.reason == "INVALID_BUDGET"
    assert [v.field for v in raised.value.violations] == ["monthly_limit_nano_usd"]
    with pytest.raises(InvalidArgument) as raised:
        await costs.check_budget(-5)
    assert raised.value.reason == "INVALID_ESTIMATE"
    assert [v.field for v in raised.value.violations] == ["estimated_cost_nano_usd"]
    bad_usage = common_pb2.Usage(
        model="gpt-4o-mini", input_tokens=10, output_tokens=-1, cached_input_tokens=11
    )
    with pytest.raises(InvalidArgument) as raised:
        await costs.check_budget(-1, estimated_usage=bad_usage)
    assert [v.field for v in raised.value.violations] == [
        "estimated_cost_nano_usd",
        "estimated_usage.output_tokens",
        "estimated_usage.cached_input_tokens",
    ]


async def test_unknown_model_is_recorded_at_zero_cost(costs: CostsClient) -> None:
    recorded = await costs.record_usage(model_usage("u1", model="mystery-7b"))
    assert (recorded.cost_nano_usd, recorded.duplicate) == (0, False)
    [row] = (await costs.get_usage()).rows
    assert (row.model, row.input_tokens) == ("mystery-7b", 1_000)


async def test_metrics_count_new_rows_only(costs: CostsClient) -> None:
    model = "claude-3-5-haiku-20241022"  # used by no other test, so deltas are ours
    tokens = ("trellis_tokens_total", {"model": model, "type": "input", "tenant": ""})
    cached = ("trellis_tokens_total", {"model": model, "type": "cached_input", "tenant": ""})
    usd = ("trellis_cost_usd_total", {"model": model, "kind": "model", "tenant": ""})
    before = [sample(name, **labels) for name, labels in (tokens, cached, usd)]

    request = model_usage("m1", model=model, input_tokens=1_000, output_tokens=0, cached=200)
    with request_scope(tenant_id="haiku-tenant"):
        cost = (await costs.record_usage(request)).cost_nano_usd
        assert cost == 800 * 800 + 200 * 80
        assert (await costs.record_usage(request)).duplicate

    after = [sample(name, **labels) for name, labels in (tokens, cached, usd)]
    assert after[0] - before[0] == 1_000
    assert after[1] - before[1] == 200
    assert after[2] - before[2] == pytest.approx(cost / 1e9)
    # Without TRELLIS_METRICS_TENANT_LABEL the tenant label stays empty.
    assert sample("trellis_tokens_total", model=model, type="input", tenant="haiku-tenant") == 0


async def test_tool_cost_metric(costs: CostsClient) -> None:
    labels = {"model": "metric_probe_tool", "kind": "tool", "tenant": ""}
    before = sample("trellis_cost_usd_total", **labels)
    request = costs_pb2.RecordUsageRequest(
        usage_id="t1", kind=TOOL, tool="metric_probe_tool", tool_cost_nano_usd=2_500_000_000
    )
    await costs.record_usage(request)
    await costs.record_usage(request)
    assert sample("trellis_cost_usd_total", **labels) - before == pytest.approx(2.5)


async def test_tenant_label_when_configured(serve, channels, tmp_path: Path) -> None:
    server = await serve(NAME, build, settings(tmp_path, metrics_tenant_label=True))
    costs = CostsClient(channels.get(server.target))
    labels = {"model": "label_probe_tool", "kind": "tool", "tenant": "labelled"}
    request = costs_pb2.RecordUsageRequest(
        usage_id="l1", kind=TOOL, tool="label_probe_tool", tool_cost_nano_usd=500_000_000
    )
    with request_scope(tenant_id="labelled"):
        await costs.record_usage(request)
        await costs.record_usage(model_usage("l2", model="gpt-4o-mini", input_tokens=7))
    assert sample("trellis_cost_usd_total", **labels) == pytest.approx(0.5)
    assert sample("trellis_tokens_total", model="gpt-4o-mini", type="input", tenant="labelled") == 7


def gauge(tenant: str) -> float | None:
    return REGISTRY.get_sample_value("trellis_budget_remaining_usd", {"tenant": tenant})


async def test_budget_remaining_gauge_follows_budgets(costs: CostsClient) -> None:
    with request_scope(tenant_id="gauged"):
        await costs.record_usage(model_usage("g0"))
        assert gauge("gauged") is None  # no budget: no series
        await costs.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=2_000_000_000))
        assert gauge("gauged") == pytest.approx(2 - MINI_1000_100 / 1e9)
        await costs.record_usage(model_usage("g1"))
        assert gauge("gauged") == pytest.approx(2 - 2 * MINI_1000_100 / 1e9)
        await costs.check_budget(500_000_000, reservation_id="g2")  # held: counts now
        assert gauge("gauged") == pytest.approx(1.5 - 2 * MINI_1000_100 / 1e9)
        await costs.set_budget(costs_pb2.SetBudgetRequest())
        assert gauge("gauged") is None


async def test_prices_file_overrides_bundled_prices(serve, channels, tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"in-house": {"input_cost_per_token": 1e-08, "output_cost_per_token": 2e-08}})
    )
    server = await serve(NAME, build, settings(tmp_path, prices_file=prices))
    costs = CostsClient(channels.get(server.target))
    recorded = await costs.record_usage(model_usage("u1", model="in-house"))
    assert recorded.cost_nano_usd == 1_000 * 10 + 100 * 20
