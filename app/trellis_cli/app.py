"""``trellis``: run the embedded demo, run a goal against a stack, chat in a session,
start the stack, look at runs, sessions and tools, costs, budgets and keys."""

from __future__ import annotations

import asyncio
import os
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.errors import NotFound, TrellisError
from trellis.runtime.logs import setup_logging
from trellis.runtime.settings import StartupError
from trellis.runtime.sqlite import DEFAULT_DATABASE_URL
from trellis_cli import cache as cache_module
from trellis_cli import chat as chat_module
from trellis_cli import costs as costs_module
from trellis_cli import exits
from trellis_cli import keys as keys_module
from trellis_cli import up as up_module
from trellis_cli.executor_call import DEFAULT_TARGET, ApiKey, Json, Target, Tenant, executor, where
from trellis_cli.exits import EXIT_INTERRUPTED, ExitCode
from trellis_cli.model_choice import ModelChoiceError, model_choice
from trellis_cli.plan_file import PlanFileError, read_plan
from trellis_cli.runs import Interrupted, client_channels, follow_to_end, until_interrupted
from trellis_cli.runs_app import runs_app, say_cancelled
from trellis_cli.sessions_app import sessions_app
from trellis_cli.tools_command import tools

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
    client: ExecutorClient,
    request: executor_pb2.RunRequest,
    target: exits.Target,
    *,
    as_json: bool = False,
) -> ExitCode:
    """Run ``request`` and show it; its exit code. The run id is chosen here (when the
    caller did not) so that Ctrl-C can cancel the run whatever has arrived by then: the
    run is cancelled, ``run <id> cancelled`` printed, and the exit code is 130."""
    request.run_id = request.run_id or uuid.uuid4().hex
    try:
        return await until_interrupted(
            follow_to_end(client.run(request), console, as_json=as_json, where=target)
        )
    except Interrupted:
        await _cancel_after_interrupt(client, request.run_id, target)
        return EXIT_INTERRUPTED


async def _cancel_after_interrupt(
    client: ExecutorClient, run_id: str, target: exits.Target
) -> None:
    """Ctrl-C left the run's stream (the executor cancels a run its last client leaves):
    CancelRun makes sure of it and says what became of the run."""
    try:
        response = await client.cancel_run(run_id)
    except NotFound:
        exits.stderr.print(f"run {run_id} cancelled before it started")
    except TrellisError as error:
        lines = exits.describe(error, target)
        exits.print_error([f"run {run_id}: the cancel was not confirmed: {lines[0]}"])
    else:
        say_cancelled(run_id, response.status)


class PlanFormatChoice(StrEnum):
    AUTO = "auto"
    JSONL = "jsonl"
    JSON_SCHEMA = "json_schema"
    TOOL_CALLS = "tool_calls"


@app.command()
def demo(
    goal: Annotated[str, typer.Argument(help="What the agent should do.")] = DEMO_GOAL,
    times: Annotated[int, typer.Option(help="Run the goal this many times (2nd: cache hits).")] = 2,
    pace_ms: Annotated[int, typer.Option(help="Offline model delay per streamed token.")] = 2,
    plan_format: Annotated[
        PlanFormatChoice,
        typer.Option(
            envvar="TRELLIS_PLAN_FORMAT",
            help="How the planner asks the model for plans (auto: per model; the offline"
            " model gets jsonl).",
        ),
    ] = PlanFormatChoice.AUTO,
) -> None:
    """Start the embedded stack (five services, real gRPC) and run a goal.

    The model is the offline rules model unless OPENAI_BASE_URL, OPENAI_API_KEY and
    TRELLIS_MODEL name another; the first line says which.
    """
    from trellis_cli.stack import start_stack  # imports every service; only the demo needs it

    setup_logging(os.environ.get("TRELLIS_LOG_LEVEL", "warning"))
    database_url = os.environ.get("TRELLIS_DATABASE_URL", DEFAULT_DATABASE_URL)
    try:
        choice = model_choice(os.environ)
    except ModelChoiceError as error:
        raise exits.fail(str(error), ExitCode.USAGE) from None

    async def main() -> ExitCode:
        try:
            stack = await start_stack(
                database_url=database_url,
                model_base_url=choice.base_url,
                model_delay_ms=pace_ms,
                plan_format=plan_format.value,
            )
        except StartupError as error:
            raise exits.fail(str(error), ExitCode.USAGE) from None
        channels = client_channels()
        target = exits.Target("embedded executor", stack.executor_target)
        code = ExitCode.SUCCEEDED
        try:
            console.print(
                f"[bold]Trellis embedded stack[/] — executor at {stack.executor_target},"
                f" plan format {plan_format.value}"
            )
            console.print(choice.describe(), highlight=False)
            client = ExecutorClient(channels.get(stack.executor_target))
            with exits.reported(target):
                for attempt in range(1, times + 1):
                    console.rule(f"[bold]run {attempt} of {times}[/]: {goal}")
                    ended = await _run_to_end(client, _request(goal, None), target)
                    if ended == EXIT_INTERRUPTED:
                        return ended
                    code = ended if code == ExitCode.SUCCEEDED else code  # the first miss
        finally:
            await channels.close()
            await stack.stop()
        return code

    raise typer.Exit(asyncio.run(main()))


@app.command()
def run(
    goal: Annotated[str, typer.Argument(help="What the agent should do.")] = "",
    target: Target = DEFAULT_TARGET,
    plan_file: Annotated[
        Path | None, typer.Option(help="JSON list of ToolCall objects: skip the planner.")
    ] = None,
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: Annotated[float, typer.Option(help="Seconds the whole run may take.")] = 300.0,
    api_key: ApiKey = "",
    run_id: Annotated[
        str, typer.Option(help="Choose the run's id (idempotent); default: a new uuid4 hex.")
    ] = "",
    session: Annotated[
        str,
        typer.Option(
            help="Run the goal as the next turn of this session: the planner sees its"
            " earlier turns (`trellis sessions show ID`)."
        ),
    ] = "",
    as_json: Json = False,
) -> None:
    """Run a goal (or an explicit plan) against a running stack.

    Exit status: 0 succeeded, 1 failed (or the service answered an error), 2 bad
    arguments or plan file, 3 partial, 4 cancelled, 5 executor unreachable, 6 refused
    (API key missing or not valid, or not allowed), 130 Ctrl-C (the run is cancelled).
    """
    if not goal and plan_file is None:
        raise typer.BadParameter("give a goal or --plan-file")
    request = _request(goal, plan_file)
    request.run_id = run_id
    request.session_id = session
    setup_logging("warning")

    async def main() -> ExitCode:
        async with executor(target, api_key, tenant, timeout) as client:
            return await _run_to_end(client, request, where(target), as_json=as_json)

    with exits.reported(where(target)):
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


app.command()(tools)
app.command()(chat_module.chat)
app.add_typer(runs_app, name="runs")
app.add_typer(sessions_app, name="sessions")
app.command()(costs_module.costs)
app.add_typer(costs_module.budget_app, name="budget")
app.add_typer(keys_module.keys_app, name="keys")
app.add_typer(cache_module.cache_app, name="cache")


def main() -> None:
    app()
