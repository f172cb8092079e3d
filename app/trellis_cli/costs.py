"""``trellis costs`` (usage report) and ``trellis budget`` (limits) against a running
cost-accounting service.

Money is shown exactly: nano-USD integers become decimal dollars with nine places,
never through a float. Rows holding events whose tokens were estimated (a stream cut
midway) say how many in the ``est.`` column. ``--json`` prints the same report for
programs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from trellis.clients.costs import CostsClient
from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.channels import Channels
from trellis.runtime.settings import ServiceSettings
from trellis_cli import exits

T = TypeVar("T")

NANO_PER_USD = 10**9
DEFAULT_TARGET = str(ServiceSettings.model_fields["costs_target"].default)
TARGET_OPTION = "--target/TRELLIS_COSTS_TARGET"

console = Console()
budget_app = typer.Typer(help="Tenants' spending limits.", no_args_is_help=True)

Target = Annotated[
    str, typer.Option(envvar="TRELLIS_COSTS_TARGET", help="gRPC target of cost accounting.")
]
Tenant = Annotated[str, typer.Option(envvar="TRELLIS_TENANT", help="The tenant.")]
Timeout = Annotated[float, typer.Option(help="Seconds each call may take.")]


def usd(nano_usd: int) -> str:
    """Exact dollars of an integer nano-USD amount, e.g. 1500 -> ``0.000001500``."""
    return f"{Decimal(nano_usd).scaleb(-9):.9f}"


def nano_usd(text: str) -> int:
    """Dollars as written (``2.5``) in whole nano-USD; more than 9 decimals is an error."""
    try:
        amount = Decimal(text) * NANO_PER_USD
    except InvalidOperation:
        raise typer.BadParameter(f"{text!r} is not an amount of USD") from None
    if not amount.is_finite() or amount < 0 or amount != amount.to_integral_value():
        raise typer.BadParameter(f"{text!r}: USD >= 0 with at most 9 decimals")
    return int(amount)


def _kind(row: costs_pb2.UsageRow) -> str:
    return "tool" if row.kind == costs_pb2.USAGE_KIND_TOOL else "model"


def report_json(report: costs_pb2.GetUsageResponse, start: str, end: str) -> dict[str, Any]:
    rows = [
        {
            "day": row.day,
            "tenant": row.tenant_id,
            "kind": _kind(row),
            "name": row.tool or row.model,
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "cached_input_tokens": row.cached_input_tokens,
            "events": row.events,
            "estimated_events": row.estimated_events,
            "estimated_input_tokens": row.estimated_input_tokens,
            "estimated_output_tokens": row.estimated_output_tokens,
            "cost_nano_usd": row.cost_nano_usd,
            "cost_usd": usd(row.cost_nano_usd),
        }
        for row in report.rows
    ]
    return {
        "from": start,
        "to": end,
        "rows": rows,
        "total_input_tokens": report.total_input_tokens,
        "total_output_tokens": report.total_output_tokens,
        "estimated_events": report.estimated_events,
        "total_cost_nano_usd": report.total_cost_nano_usd,
        "total_cost_usd": usd(report.total_cost_nano_usd),
    }


def _estimated(events: int) -> str:
    """The ``est.`` cell: how many events were estimated, blank when none."""
    return f"{events:,}" if events else ""


def report_table(report: costs_pb2.GetUsageResponse, title: str) -> Table:
    """One line per day, tenant, kind and model or tool, and a total line."""
    rows = report.rows
    cells = [
        [
            row.day,
            row.tenant_id,
            _kind(row),
            row.tool or row.model,
            f"{row.input_tokens:,}",
            f"{row.output_tokens:,}",
            f"{row.cached_input_tokens:,}",
            f"{row.events:,}",
            _estimated(row.estimated_events),
            usd(row.cost_nano_usd),
        ]
        for row in rows
    ]
    total = ["total", "", "", ""] + [
        f"{sum(getattr(row, name) for row in rows):,}"
        for name in ("input_tokens", "output_tokens", "cached_input_tokens", "events")
    ]
    total += [_estimated(report.estimated_events), usd(report.total_cost_nano_usd)]
    caption = (
        "est.: events whose tokens were estimated (a stream cut midway)"
        if report.estimated_events
        else None
    )
    table = Table(title=title, caption=caption, show_footer=True)
    headers = [
        "day", "tenant", "kind", "model/tool", "input", "output", "cached", "events", "est.", "USD"
    ]  # fmt: skip
    for i, header in enumerate(headers):
        table.add_column(header, total[i], justify="right" if i >= 4 else "left", no_wrap=True)
    for line in cells:
        table.add_row(*line)
    return table


def _call(
    target: str, tenant: str, timeout: float, use: Callable[[CostsClient], Awaitable[T]]
) -> T:
    """Run one client call as ``tenant``; an error is reported as by every command
    (``trellis_cli.exits``)."""

    async def main() -> T:
        channels = Channels()
        try:
            with context.request_scope(tenant_id=tenant):
                return await use(CostsClient(channels.get(target), timeout=timeout))
        finally:
            await channels.close()

    with exits.reported(exits.Target("cost accounting", target, TARGET_OPTION)):
        return asyncio.run(main())


def costs(
    tenant: Tenant = context.DEFAULT_TENANT,
    start: Annotated[
        str, typer.Option("--from", help="First UTC day, YYYY-MM-DD (default: today).")
    ] = "",
    end: Annotated[
        str, typer.Option("--to", help="Last UTC day, YYYY-MM-DD (default: today).")
    ] = "",
    target: Target = DEFAULT_TARGET,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    session: Annotated[
        str, typer.Option("--session", help="Only the usage of this session's turns.")
    ] = "",
    timeout: Timeout = 10.0,
) -> None:
    """Usage and cost of a tenant by day and model or tool, with totals (of one session
    with --session)."""
    today = datetime.now(UTC).date().isoformat()
    start, end = start or today, end or today
    report = _call(
        target, tenant, timeout, lambda c: c.get_usage(tenant, start, end, session_id=session)
    )
    if as_json:
        typer.echo(json.dumps(report_json(report, start, end), indent=2))
        return
    title = f"costs of {tenant}" + (f", session {session}" if session else "")
    table = report_table(report, f"{title}, {start} to {end}")
    # Never cut a figure short: wider than the terminal, lines wrap instead.
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(width=max(console.width, natural)).print(table)


@budget_app.command("set")
def budget_set(
    tenant: Tenant = context.DEFAULT_TENANT,
    daily: Annotated[
        str | None, typer.Option(help="Daily limit in USD (0 removes it; not given: kept).")
    ] = None,
    monthly: Annotated[
        str | None, typer.Option(help="Monthly limit in USD (0 removes it; not given: kept).")
    ] = None,
    target: Target = DEFAULT_TARGET,
    timeout: Timeout = 10.0,
) -> None:
    """Set a tenant's daily and/or monthly limit; a limit not given keeps its value (both
    0 remove the budget)."""
    request = budget_request(tenant, daily, monthly)
    _call(target, tenant, timeout, lambda c: c.set_budget(request))
    _show(_call(target, tenant, timeout, lambda c: c.check_budget(0)), tenant)


def budget_request(
    tenant: str, daily: str | None, monthly: str | None
) -> costs_pb2.SetBudgetRequest:
    """A SetBudget of the limits given, named in its update_mask (the others are kept)."""
    given = {
        name: nano_usd(text)
        for name, text in (("daily_limit_nano_usd", daily), ("monthly_limit_nano_usd", monthly))
        if text is not None
    }
    if not given:
        raise typer.BadParameter("give --daily, --monthly or both (0 removes a limit)")
    request = costs_pb2.SetBudgetRequest(tenant_id=tenant, **given)
    request.update_mask.paths.extend(given)
    return request


@budget_app.command("show")
def budget_show(
    tenant: Tenant = context.DEFAULT_TENANT,
    target: Target = DEFAULT_TARGET,
    timeout: Timeout = 10.0,
) -> None:
    """A tenant's limits, what it spent today and this month, and what is left."""
    _show(_call(target, tenant, timeout, lambda c: c.check_budget(0)), tenant)


def _show(check: costs_pb2.CheckBudgetResponse, tenant: str) -> None:
    if not (check.daily_limit_nano_usd or check.monthly_limit_nano_usd):
        console.print(f"{tenant}: no budget")
        return
    table = Table(title=f"budget of {tenant}")
    for header in ("limit", "USD", "spent", "left (after holds)"):
        table.add_column(header, justify="left" if header == "limit" else "right")
    held = check.reserved_nano_usd
    for name, limit, spent in [
        ("daily", check.daily_limit_nano_usd, check.spent_today_nano_usd),
        ("monthly", check.monthly_limit_nano_usd, check.spent_this_month_nano_usd),
    ]:
        left = usd(max(0, limit - spent - held)) if limit else "-"
        table.add_row(name, usd(limit) if limit else "none", usd(spent), left)
    console.print(table)
