"""``trellis runs``: the operator's view of run history, against the executor.

``list`` pages through ListRuns (newest first) up to ``--limit`` runs; ``show`` is one
stored run (GetRun) as a table of its nodes with the answer, totals and the trace link;
``cancel`` is CancelRun; ``watch`` follows a run live (ResumeRun: attached to it, or
replayed when it has ended) with ``trellis run``'s view and exit status. Ctrl-C stops
watching without cancelling the run (exit 130).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.convert import seconds, timestamp
from trellis_cli import exits
from trellis_cli.executor_call import (
    DEFAULT_TARGET,
    ApiKey,
    Json,
    Target,
    Tenant,
    call,
    executor,
    where,
)
from trellis_cli.exits import EXIT_INTERRUPTED, ExitCode
from trellis_cli.runs import Interrupted, follow_to_end, to_json, until_interrupted
from trellis_cli.since import parse_since
from trellis_cli.view import STATE_STYLE, WIDE_COLUMNS, RunView

console = Console()
runs_app = typer.Typer(help="Run history: list, show, cancel and watch runs.", no_args_is_help=True)

Timeout = Annotated[float, typer.Option(help="Seconds each call may take.")]
STATUSES = ["running", "succeeded", "failed", "partial", "cancelled"]


def status_name(status: int) -> str:
    return executor_pb2.RunStatus.Name(status).removeprefix("RUN_STATUS_").lower()  # type: ignore[arg-type]


# -- list -------------------------------------------------------------------------------------


async def collect(
    client: ExecutorClient, request: executor_pb2.ListRunsRequest, limit: int
) -> tuple[list[executor_pb2.RunSummary], bool]:
    """Up to ``limit`` runs, page after page; and whether more match."""
    runs: list[executor_pb2.RunSummary] = []
    while True:
        request.page_size = min(limit - len(runs), 1000)
        page = await client.list_runs(request)
        runs.extend(page.runs)
        if not page.next_page_token or len(runs) >= limit:
            return runs[:limit], bool(page.next_page_token)
        request.page_token = page.next_page_token


def _local(moment: Timestamp, wide: bool) -> str:
    when = datetime.fromtimestamp(moment.seconds + moment.nanos / 1e9).astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S" if wide else "%m-%d %H:%M")


def _nodes(counts: executor_pb2.NodeCounts) -> str:
    text = f"{counts.succeeded}/{counts.total}"
    bad = counts.failed + counts.cancelled
    return text + (f" ✗{bad}" if bad else "")


def runs_table(runs: list[executor_pb2.RunSummary], width: int) -> Table:
    """One line per run at any width: more columns from ``WIDE_COLUMNS`` on."""
    wide = width >= WIDE_COLUMNS
    table = Table(box=None, pad_edge=False, expand=True, header_style="bold")
    table.add_column("run", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("nodes", no_wrap=True)
    if wide:
        table.add_column("cost", no_wrap=True, justify="right")
        table.add_column("tokens", no_wrap=True, justify="right")
        table.add_column("time", no_wrap=True, justify="right")
    table.add_column("goal", ratio=1, no_wrap=True, overflow="ellipsis", min_width=8)
    for run in runs:
        status = status_name(run.status)
        style = {"partial": "yellow", "running": "yellow"}.get(status, STATE_STYLE.get(status, ""))
        goal = run.goal + ("…" if run.goal_truncated else "")
        cells: list[str | Text] = [
            run.run_id,
            _local(run.created_at, wide),
            Text(status, style=style),
            _nodes(run.nodes),
        ]
        if wide:
            ended = run.status != executor_pb2.RUN_STATUS_RUNNING
            tokens = run.usage.input_tokens + run.usage.output_tokens
            cells += [
                f"${run.cost_nano_usd / 1e9:.6f}" if ended else "-",
                f"{tokens:,}" if ended else "-",
                f"{seconds(run.duration):.1f} s" if ended else "-",
            ]
        table.add_row(*cells, " ".join(goal.split()) or "(explicit plan)")
    return table


@runs_app.command("list")
def list_runs(
    status: Annotated[
        str | None,
        typer.Option(help=f"Only runs in this status: {', '.join(STATUSES)}."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only runs created since: 30m, 2h, 7d, or an ISO date/time."),
    ] = None,
    session: Annotated[str, typer.Option(help="Only runs of this session.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="Most runs to show (newest first).")] = 20,
    as_json: Json = False,
    target: Target = DEFAULT_TARGET,
    api_key: ApiKey = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: Timeout = 30.0,
) -> None:
    """The tenant's runs, newest first: id, creation time, status, nodes that succeeded
    (of all, ✗ failed or cancelled), goal; cost, tokens and duration on wide terminals."""
    request = executor_pb2.ListRunsRequest(session_id=session)
    if status is not None:
        if status.lower() not in STATUSES:
            choices = ", ".join(STATUSES)
            raise typer.BadParameter(f"{status!r}: one of {choices}", param_hint="--status")
        request.status = executor_pb2.RunStatus.Value(f"RUN_STATUS_{status.upper()}")
    if since is not None:
        request.created_after.CopyFrom(timestamp(parse_since(since)))
    runs, more = call(
        target, api_key, tenant, timeout, lambda client: collect(client, request, limit)
    )
    if as_json:
        for run in runs:
            typer.echo(to_json(run))
        return
    if not runs:
        console.print("no runs", highlight=False)
        return
    console.print(runs_table(runs, console.width))
    if more:
        console.print(f"[dim]the {len(runs)} newest shown; --limit N shows more[/]")


# -- show -------------------------------------------------------------------------------------


@runs_app.command("show")
def show(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="The stored Run as proto3 JSON.")] = False,
    target: Target = DEFAULT_TARGET,
    api_key: ApiKey = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: Timeout = 30.0,
) -> None:
    """One run: its goal, each node (tool, args, state, time, cache, output head or error),
    the answer, tokens, cost, and the trace's link (TRELLIS_TRACE_URL_TEMPLATE)."""
    run = call(target, api_key, tenant, timeout, lambda client: client.get_run(run_id))
    if as_json:
        typer.echo(to_json(run))
        return
    view = RunView.from_run(run)
    created = _local(run.created_at, wide=True)
    console.print(f"[bold]run {run.run_id}[/] — {status_name(run.status)}, created {created}")
    if run.session_id:
        console.print(f"session: {run.session_id}", highlight=False)
    if run.goal:
        console.print(f"goal: {run.goal}", highlight=False)
    if view.nodes:
        console.print(view.table(console.width))
    if run.answer:
        console.print("\n" + run.answer, highlight=False)
    console.print()
    if run.status == executor_pb2.RUN_STATUS_RUNNING:
        console.print(f"status: running ({len(run.outcomes)} of {len(run.plan)} nodes done)")
        console.print(f"watch it: trellis runs watch {run.run_id}", highlight=False)
        lines = [line for line in view.summary() if line.startswith(("trace", "run_id"))]
    else:
        lines = view.summary()
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


# -- cancel -----------------------------------------------------------------------------------


def say_cancelled(run_id: str, status: int) -> ExitCode:
    """What became of a run asked to cancel; 0 only if it is cancelled now."""
    if status == executor_pb2.RUN_STATUS_CANCELLED:
        exits.stderr.print(f"run {run_id} cancelled")
        return ExitCode.SUCCEEDED
    if status == executor_pb2.RUN_STATUS_RUNNING:
        exits.print_error(
            [f"run {run_id} is still running: its executor has not ended it yet (try again)"]
        )
    else:
        exits.print_error([f"run {run_id} had already ended: {status_name(status)}"])
    return ExitCode.FAILED


@runs_app.command("cancel")
def cancel(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    target: Target = DEFAULT_TARGET,
    api_key: ApiKey = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: Timeout = 30.0,
) -> None:
    """Cancel a running run (its tool calls in flight end CANCELLED). Exit 0 when it is
    cancelled, 1 when it had already ended (or its executor did not end it in time)."""
    response = call(target, api_key, tenant, timeout, lambda client: client.cancel_run(run_id))
    raise typer.Exit(say_cancelled(run_id, response.status))


# -- watch ------------------------------------------------------------------------------------


@runs_app.command("watch")
def watch(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    as_json: Json = False,
    target: Target = DEFAULT_TARGET,
    api_key: ApiKey = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: Annotated[float, typer.Option(help="Seconds to watch at most.")] = 3600.0,
) -> None:
    """Follow a run live from where it is (a run that ended is replayed); exit status as
    `trellis run`'s. Ctrl-C stops watching; the run goes on (exit 130)."""

    async def main() -> ExitCode:
        async with executor(target, api_key, tenant, timeout) as client:
            events = client.resume_run(run_id)
            try:
                return await until_interrupted(
                    follow_to_end(events, console, as_json=as_json, where=where(target))
                )
            except Interrupted:
                exits.stderr.print(
                    f"stopped watching run {run_id}; it goes on"
                    f" (`trellis runs cancel {run_id}` cancels it)"
                )
                return EXIT_INTERRUPTED

    with exits.reported(where(target)):
        code = asyncio.run(main())
    raise typer.Exit(code)
