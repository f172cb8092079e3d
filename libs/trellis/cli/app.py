"""``trellis``: run the embedded demo, run a goal against a stack, start the stack."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trellis.cli import costs as costs_module
from trellis.cli import keys as keys_module
from trellis.cli import up as up_module
from trellis.cli.runs import client_channels, show_run
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import TrellisError
from trellis.runtime.logs import setup_logging
from trellis.runtime.sqlite import DEFAULT_DATABASE_URL

DEMO_GOAL = "Report this machine's OS, disk usage and uptime"

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console()


def _request(goal: str, plan_file: Path | None) -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest(goal=goal)
    if plan_file is not None:
        for node in json.loads(plan_file.read_text()):
            request.plan.append(
                common_pb2.ToolCall(
                    node_id=node["node_id"],
                    tool=node["tool"],
                    args=to_struct(node.get("args")),
                    depends_on=node.get("depends_on", []),
                )
            )
    return request


@app.command()
def demo(
    goal: Annotated[str, typer.Argument(help="What the agent should do.")] = DEMO_GOAL,
    times: Annotated[int, typer.Option(help="Run the goal this many times (2nd: cache hits).")] = 2,
    pace_ms: Annotated[int, typer.Option(help="Offline model delay per streamed token.")] = 2,
) -> None:
    """Start the embedded stack (five services, real gRPC, offline model) and run a goal."""
    from trellis.cli.stack import start_stack  # imports every service; only the demo needs it

    setup_logging(os.environ.get("TRELLIS_LOG_LEVEL", "warning"))
    database_url = os.environ.get("TRELLIS_DATABASE_URL", DEFAULT_DATABASE_URL)

    async def main() -> None:
        stack = await start_stack(database_url=database_url, model_delay_ms=pace_ms)
        channels = client_channels()
        try:
            console.print(f"[bold]Trellis embedded stack[/] — executor at {stack.executor_target}")
            client = ExecutorClient(channels.get(stack.executor_target))
            for attempt in range(1, times + 1):
                console.rule(f"[bold]run {attempt} of {times}[/]: {goal}")
                await show_run(client, _request(goal, None), console)
        finally:
            await channels.close()
            await stack.stop()

    _run_async(main())


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
) -> None:
    """Run a goal (or an explicit plan) against a running stack."""
    if not goal and plan_file is None:
        raise typer.BadParameter("give a goal or --plan-file")
    setup_logging("warning")

    async def main() -> None:
        channels = client_channels()
        try:
            with context.request_scope(timeout=timeout, tenant_id=tenant):
                client = ExecutorClient(channels.get(target), api_key=api_key or None)
                view = await show_run(client, _request(goal, plan_file), console)
            if view.finished is None or view.finished.status != executor_pb2.RUN_STATUS_SUCCEEDED:
                raise typer.Exit(1)
        finally:
            await channels.close()

    _run_async(main())


@app.command()
def up() -> None:
    """Start the five services as separate processes on their default ports."""
    raise typer.Exit(asyncio.run(up_module.up(echo=console.print)))


app.command()(costs_module.costs)
app.add_typer(costs_module.budget_app, name="budget")
app.add_typer(keys_module.keys_app, name="keys")


def _run_async(coro: object) -> None:
    try:
        asyncio.run(coro)  # type: ignore[arg-type]
    except TrellisError as error:
        console.print(f"[red]error[/] {error.reason}: {error.message}")
        raise typer.Exit(1) from None


def main() -> None:
    app()
