"""Drive one run against an executor and show it live (shared by ``demo`` and ``run``)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.live import Live

from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime import tls
from trellis.runtime.channels import Channels
from trellis.runtime.errors import TrellisError
from trellis_cli.view import RunView


def client_channels() -> Channels:
    """Channels for the CLI's calls: mTLS when TRELLIS_TLS_* name a certificate, key and
    CA (as for the services), plaintext otherwise."""
    try:
        files = tls.from_env()
    except tls.TlsConfigError as error:
        raise typer.BadParameter(str(error)) from None
    return Channels(credentials=None if files is None else files.channel_credentials())


async def show_run(
    client: ExecutorClient,
    request: executor_pb2.RunRequest,
    console: Console,
    view: RunView | None = None,
) -> RunView:
    """Stream the run's events into a live table; print the answer and totals after.

    The table appears with the first event (a call refused at once shows only its error).
    An error that ends the stream after ``finished`` (a streamed plan found invalid) is
    raised after the totals are printed; ``view`` keeps what arrived either way.
    """
    view = RunView() if view is None else view
    live = Live(view.render(), console=console, refresh_per_second=12, transient=False)
    failure: TrellisError | None = None
    try:
        async for event in client.run(request):
            view.apply(event)
            if not live.is_started:
                live.start()
            live.update(view.render())
    except TrellisError as error:
        failure = error
    finally:
        if live.is_started:
            live.stop()
            console.print()  # the live view leaves the cursor on its last line
    if failure is None or view.finished is not None:
        for line in view.summary():
            console.print(line, highlight=False)
    if failure is not None:
        raise failure
    return view
