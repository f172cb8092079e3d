"""`trellis costs` and `trellis budget` against a real cost-accounting process."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from trellis.clients.costs import CostsClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime.channels import Channels
from trellis.runtime.context import request_scope
from trellis.runtime.convert import timestamp
from trellis_cli.app import app

COSTS_SERVICE = "trellis.costs.v1.CostAccountingService"
TENANT = "cli-acme"
# gpt-4o-mini: 150 nano-USD per input token, 600 per output token.
MINI_1000_100 = 1_000 * 150 + 100 * 600


@pytest.fixture
async def costs_target(service_process, tmp_path: Path) -> str:
    process = service_process(
        "trellis_costs",
        "costs",
        COSTS_SERVICE,
        {"TRELLIS_DATABASE_URL": f"sqlite:///{tmp_path}/costs.db"},
    )
    await process.wait_serving()
    return process.target


@pytest.fixture
async def client(costs_target: str):
    channels = Channels()
    yield CostsClient(channels.get(costs_target))
    await channels.close()


async def seed(client: CostsClient) -> None:
    usage = common_pb2.Usage(model="gpt-4o-mini", input_tokens=1_000, output_tokens=100)
    march = timestamp(datetime(2025, 3, 1, 9, tzinfo=UTC))
    with request_scope(tenant_id=TENANT):
        await client.record_usage(
            costs_pb2.RecordUsageRequest(
                usage_id="m1", kind=costs_pb2.USAGE_KIND_MODEL, usage=usage
            )
        )
        for usage_id, cost, when in [("t1", 1_500, None), ("t2", 7, march)]:
            request = costs_pb2.RecordUsageRequest(
                usage_id=usage_id,
                kind=costs_pb2.USAGE_KIND_TOOL,
                tool="web_search",
                tool_cost_nano_usd=cost,
            )
            if when is not None:
                request.occurred_at.CopyFrom(when)
            await client.record_usage(request)


async def trellis(*args: str, **env: str) -> Result:
    """Run the CLI in a worker thread: it runs its own event loop, as from a shell."""
    runner = CliRunner(env={"COLUMNS": "80", "TRELLIS_TENANT": None, **env})
    return await asyncio.to_thread(runner.invoke, app, list(args))


async def test_costs_prints_today_by_model_and_tool_with_exact_totals(
    client: CostsClient, costs_target: str
) -> None:
    await seed(client)
    result = await trellis("costs", "--tenant", TENANT, "--target", costs_target)
    assert result.exit_code == 0, result.output
    today = datetime.now(UTC).date().isoformat()
    lines = result.output.splitlines()
    model = next(line for line in lines if "gpt-4o-mini" in line).split()
    tool = next(line for line in lines if "web_search" in line).split()
    assert [c for c in model if c not in "│┃"] == [
        today, TENANT, "model", "gpt-4o-mini", "1,000", "100", "0", "1", "0.000210000"
    ]  # fmt: skip
    assert [c for c in tool if c not in "│┃"] == [
        today, TENANT, "tool", "web_search", "0", "0", "0", "1", "0.000001500"
    ]  # fmt: skip
    total = next(line for line in lines if "total" in line).split()
    assert [c for c in total if c not in "│┃"] == ["total", "1,000", "100", "0", "2", "0.000211500"]
    assert "2025-03-01" not in result.output  # outside the default window (today)


async def test_costs_json_over_a_window_and_target_from_the_environment(
    client: CostsClient, costs_target: str
) -> None:
    await seed(client)
    result = await trellis(
        "costs", "--tenant", TENANT, "--from", "2025-03-01", "--to", "2025-03-01", "--json",
        TRELLIS_COSTS_TARGET=costs_target,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "from": "2025-03-01",
        "to": "2025-03-01",
        "rows": [
            {
                "day": "2025-03-01",
                "tenant": TENANT,
                "kind": "tool",
                "name": "web_search",
                "input_tokens": 0,
                "output_tokens": 0,
                "cached_input_tokens": 0,
                "events": 1,
                "estimated_events": 0,
                "estimated_input_tokens": 0,
                "estimated_output_tokens": 0,
                "cost_nano_usd": 7,
                "cost_usd": "0.000000007",
            }
        ],
        "total_input_tokens": 0,
        "total_output_tokens": 0,
        "estimated_events": 0,
        "total_cost_nano_usd": 7,
        "total_cost_usd": "0.000000007",
    }


async def test_estimated_events_are_marked_in_the_table_and_the_json(
    client: CostsClient, costs_target: str
) -> None:
    await seed(client)
    cut = common_pb2.Usage(model="gpt-4o-mini", input_tokens=300, output_tokens=20)
    with request_scope(tenant_id=TENANT):
        await client.record_usage(
            costs_pb2.RecordUsageRequest(
                usage_id="m2", kind=costs_pb2.USAGE_KIND_MODEL, usage=cut, estimated=True
            )
        )
    result = await trellis("costs", "--tenant", TENANT, "--target", costs_target)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "model/tool" in line)
    assert "est." in header
    model = next(line for line in lines if "gpt-4o-mini" in line).split()
    assert [c for c in model if c not in "│┃"][4:] == [
        "1,300", "120", "0", "2", "1", f"{(MINI_1000_100 + 300 * 150 + 20 * 600) / 1e9:.9f}"
    ]  # fmt: skip
    tool = next(line for line in lines if "web_search" in line).split()
    assert len([c for c in tool if c not in "│┃"]) == 9  # no est. cell: nothing estimated
    total = next(line for line in lines if "total" in line).split()
    assert [c for c in total if c not in "│┃"][1:6] == ["1,300", "120", "0", "3", "1"]
    assert "estimated" in result.output  # the caption says what est. means

    as_json = json.loads(
        (await trellis("costs", "--tenant", TENANT, "--target", costs_target, "--json")).output
    )
    [row] = [r for r in as_json["rows"] if r["name"] == "gpt-4o-mini"]
    assert (row["events"], row["estimated_events"]) == (2, 1)
    assert (row["estimated_input_tokens"], row["estimated_output_tokens"]) == (300, 20)
    totals = ("total_input_tokens", "total_output_tokens", "estimated_events")
    assert [as_json[k] for k in totals] == [1_300, 120, 1]


async def test_bad_days_are_reported_by_field(costs_target: str) -> None:
    result = await trellis("costs", "--from", "2025-13-01", "--target", costs_target)
    assert result.exit_code == 1
    assert "INVALID_DAY" in result.output and "start_day" in result.output


async def test_budget_set_and_show(client: CostsClient, costs_target: str) -> None:
    await seed(client)
    result = await trellis(
        "budget", "set", "--tenant", TENANT, "--daily", "0.5", "--monthly", "10",
        "--target", costs_target,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with request_scope(tenant_id=TENANT):
        check = await client.check_budget(0)
    assert (check.daily_limit_nano_usd, check.monthly_limit_nano_usd) == (500_000_000, 10**10)
    daily = next(line for line in result.output.splitlines() if "daily" in line).split()
    spent = MINI_1000_100 + 1_500
    assert [c for c in daily if c not in "│┃"] == [
        "daily", "0.500000000", "0.000211500", f"{(500_000_000 - spent) / 1e9:.9f}"
    ]  # fmt: skip

    shown = await trellis("budget", "show", "--tenant", TENANT, "--target", costs_target)
    assert shown.exit_code == 0 and "10.000000000" in shown.output

    removed = await trellis(
        "budget", "set", "--tenant", TENANT, "--daily", "0", "--monthly", "0",
        "--target", costs_target,
    )  # fmt: skip
    assert removed.exit_code == 0 and f"{TENANT}: no budget" in removed.output


async def test_budget_set_keeps_the_limit_it_is_not_given(
    client: CostsClient, costs_target: str
) -> None:
    async def limits() -> tuple[int, int]:
        with request_scope(tenant_id=TENANT):
            check = await client.check_budget(0)
        return check.daily_limit_nano_usd, check.monthly_limit_nano_usd

    async def budget_set(*args: str) -> Result:
        return await trellis("budget", "set", "--tenant", TENANT, *args, "--target", costs_target)

    assert (await budget_set("--daily", "5")).exit_code == 0
    assert (await budget_set("--monthly", "200")).exit_code == 0
    assert await limits() == (5 * 10**9, 200 * 10**9)  # the daily limit stayed
    assert (await budget_set("--daily", "0")).exit_code == 0  # explicitly removed
    assert await limits() == (0, 200 * 10**9)
    nothing = await budget_set()
    assert nothing.exit_code == 2 and "--daily" in nothing.output
    assert await limits() == (0, 200 * 10**9)


@pytest.mark.parametrize(
    ("amount", "why"),
    [
        ("0.0000000001", "at most 9 decimals"),
        ("-1", "USD >= 0"),
        ("lots", "not an amount of USD"),
    ],
)
async def test_budget_amounts_must_be_whole_nano_usd(amount: str, why: str) -> None:
    result = await trellis("budget", "set", f"--daily={amount}", "--target", "unused:1")
    assert result.exit_code == 2 and why in result.output
