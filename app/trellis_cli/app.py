"""``trellis``: run the embedded demo, run a goal against a stack, start the stack."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.errors import TrellisError
from trellis.runtime.logs import setup_logging
from trellis.runtime.settings import StartupError
from trellis.runtime.sqlite import DEFAULT_DATABASE_URL
from trellis_cli import cache as cache_module
from trellis_cli import costs as costs_module
from trellis_cli import exits
from trellis_cli import keys as keys_module
from trellis_cli import up as up_module
from trellis_cli.exits import ExitCode
from trellis_cli.plan_file import PlanFileError, read_plan
from trellis_cli.runs import client_channels, show_run
from trellis_cli.view import RunView

DEMO_GOAL = "Report this machine's OS, disk usage and uptime"

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console()


def _request(goal: str, plan_file: Path | None) -> executor_pb2.RunRequest:
    """The RunRequest; a bad plan file exits 2 with one line naming it."""
    request = executor_pb2.RunRequest(goal=goal)
    if plan_file is not None:
        try:
            request.plan.extend(read_plan(plan_file))
        except PlanFileError as error:
            raise exits.fail(str(error), ExitCode.USAGE) from None
    return request


async def _run_to_end(
    client: ExecutorClient, request: executor_pb2.RunRequest, where: exits.Target
) -> ExitCode:
    """Show one run; its exit code. An error after ``finished`` is printed, and the run's
    status decides; an error before it is the caller's to report (``exits.reported``)."""
    view = RunView()
    try:
        await show_run(client, request, console, view)
    except TrellisError as error:
        if view.finished is None:
            raise
        exits.print_error(exits.describe(error, where))
    return exits.for_run(view.finished)


@app.command()
def demo(
    goal: Annotated[str, typer.Argument(help="What the agent should do.")] = DEMO_GOAL,
    times: Annotated[int, typer.Option(help="Run the goal this many times (2nd: cache hits).")] = 2,
    pace_ms: Annotated[int, typer.Option(help="Offline model delay per streamed token.")] = 2,
) -> None:
    """Start the embedded stack (five services, real gRPC, offline model) and run a goal."""
    from trellis_cli.stack import start_stack  # imports every service; only the demo needs it

    setup_logging(os.environ.get("TRELLIS_LOG_LEVEL", "warning"))
    database_url = os.environ.get("TRELLIS_DATABASE_URL", DEFAULT_DATABASE_URL)

    async def main() -> ExitCode:
        try:
            stack = await start_stack(database_url=database_url, model_delay_ms=pace_ms)
        except StartupError as error:
            raise exits.fail(str(error), ExitCode.USAGE) from None
        channels = client_channels()
        where = exits.Target("embedded executor", stack.executor_target)
        code = ExitCode.SUCCEEDED
        try:
            console.print(f"[bold]Trellis embedded stack[/] — executor at {stack.executor_target}")
            client = ExecutorClient(channels.get(stack.executor_target))
            with exits.reported(where):
                for attempt in range(1, times + 1):
                    console.rule(f"[bold]run {attempt} of {times}[/]: {goal}")
                    ended = await _run_to_end(client, _request(goal, None), where)
                    code = ended if code == ExitCode.SUCCEEDED else code  # the first miss
        finally:
            await channels.close()
            await stack.stop()
        return code

    raise typer.Exit(asyncio.run(main()))


@app.command()
def run(
    goal: Annotated[str, typer.Argument(help="What the agent should do.")] = "",
    target: Annotated[str, typer.Option(envvar="TRELLIS_EXECUTOR_TARGET")] = "localhost:50051",
    plan_file: Annotated[
        Path | None, typer.Option(help="JSON list of ToolCall objects: skip the planner.")
    ] = None,
    tenant: Annotated[str, typer.Option(envvar="TRELLIS_TENANT")] = context.DEFAULT_TENANT,
    timeout: Annotated[float, typer.Option(help="Seconds the whole run may take.")] = 300.0,
    api_key: Annotated[
        str,
        typer.Option(
            envvar="TRELLIS_API_KEY",
            help="API key (executor with auth on; its tenant replaces --tenant).",
        ),
    ] = "",
    run_id: Annotated[
        str, typer.Option(help="Choose the run's id (idempotent); default: the executor does.")
    ] = "",
) -> None:
    """Run a goal (or an explicit plan) against a running stack.

    Exit status: 0 succeeded, 1 failed (or the service answered an error), 2 bad
    arguments or plan file, 3 partial, 4 cancelled, 5 executor unreachable, 6 refused
    (API key missing or not valid, or not allowed).
    """
    if not goal and plan_file is None:
        raise typer.BadParameter("give a goal or --plan-file")
    request = _request(goal, plan_file)
    request.run_id = run_id
    setup_logging("warning")
    where = exits.Target("executor", target, "--target/TRELLIS_EXECUTOR_TARGET")

    async def main() -> ExitCode:
        channels = client_channels()
        try:
            with context.request_scope(timeout=timeout, tenant_id=tenant):
                client = ExecutorClient(channels.get(target), api_key=api_key or None)
                return await _run_to_end(client, request, where)
        finally:
            await channels.close()

    with exits.reported(where):
        code = asyncio.run(main())
    raise typer.Exit(code)


@app.command()
def up(
    port_base: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535 - up_module.PORT_BLOCK + 1,
            help="Move the whole stack to a block of ports: the offline model on N, the"
            " services' gRPC ports N+1..N+5 (executor, planner, toolgateway, cache, costs),"
            " their metrics ports N+11..N+15.",
        ),
    ] = None,
) -> None:
    """Start the five services (and the offline model) as processes, on their default ports
    or from --port-base; refuses with one line if any of those ports is in use."""
    code = asyncio.run(
        up_module.up(
            echo=console.print,
            fail=lambda line: exits.print_error([line]),
            port_base=port_base,
        )
    )
    raise typer.Exit(code)


app.command()(costs_module.costs)
app.add_typer(costs_module.budget_app, name="budget")
app.add_typer(keys_module.keys_app, name="keys")
app.add_typer(cache_module.cache_app, name="cache")


def main() -> None:
    app()
