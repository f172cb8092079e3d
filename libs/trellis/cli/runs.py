"""Drive one run against an executor and show it live (shared by ``demo`` and ``run``)."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live

from trellis.cli.view import RunView
from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2


async def show_run(
    client: ExecutorClient, request: executor_pb2.RunRequest, console: Console
) -> RunView:
    """Stream the run's events into a live table; print the answer and totals after."""
    view = RunView()
    with Live(view.render(), console=console, refresh_per_second=12, transient=False) as live:
        async for event in client.run(request):
            view.apply(event)
            live.update(view.render())
    console.print()  # the live view leaves the cursor on its last line
    for line in view.summary():
        console.print(line, highlight=False)
    return view
