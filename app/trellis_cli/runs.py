"""Drive one run's event stream (a new run, or one being watched) to the terminal.

``show_run`` draws the stream live (``view.LiveRun``) and prints the answer and totals
after; ``print_json`` writes each event as one line of proto3 JSON (``--json``, the
.proto field names, as the Node client's ``--json``). ``until_interrupted`` turns Ctrl-C
into ``Interrupted`` after cancelling the stream, so a command can say what became of
the run instead of dying silently.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.live import Live

from trellis.executor.v1 import executor_pb2
from trellis.runtime import tls
from trellis.runtime.channels import Channels
from trellis.runtime.errors import TrellisError
from trellis_cli import exits
from trellis_cli.exits import ExitCode
from trellis_cli.view import LiveRun, RunView

T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C (SIGINT) arrived; the work under it was cancelled."""


def client_channels() -> Channels:
    """Channels for the CLI's calls: mTLS when TRELLIS_TLS_* name a certificate, key and
    CA (as for the services), plaintext otherwise."""
    try:
        files = tls.from_env()
    except tls.TlsConfigError as error:
        raise typer.BadParameter(str(error)) from None
    return Channels(credentials=None if files is None else files.channel_credentials())


async def until_interrupted(work: Awaitable[T]) -> T:
    """Await ``work``; on SIGINT cancel it (a streaming call is then cancelled, and the
    server sees its client leave) and raise ``Interrupted``."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await task
    except asyncio.CancelledError:
        if interrupted:
            raise Interrupted from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def to_json(message: Message) -> str:
    """One line of proto3 JSON with the .proto field names."""
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True)


async def print_json(events: AsyncIterator[executor_pb2.RunResponse], view: RunView) -> RunView:
    """``--json``: each event as one line of proto3 JSON as it arrives."""
    async for event in events:
        view.apply(event)
        print(to_json(event), flush=True)
    return view


#: Redraws per second while nothing arrives (the spinner and the planning clock move).
REDRAWS_PER_SECOND = 8


async def _tick(live: Live) -> None:
    while True:
        await asyncio.sleep(1 / REDRAWS_PER_SECOND)
        live.refresh()


async def show_run(
    events: AsyncIterator[executor_pb2.RunResponse],
    console: Console,
    view: RunView | None = None,
) -> RunView:
    """Draw the run's events live; print the answer and totals after.

    The table appears with the first event (a call refused at once shows only its error).
    An error that ends the stream after ``finished`` (a streamed plan found invalid) is
    raised after the totals are printed; ``view`` keeps what arrived either way.
    """
    view = RunView() if view is None else view
    # Drawn from this event loop only (no refresh thread): events and redraws never race.
    live = Live(LiveRun(view), console=console, auto_refresh=False, transient=False)
    ticker: asyncio.Task[None] | None = None
    failure: TrellisError | None = None
    try:
        async for event in events:
            view.apply(event)
            if not live.is_started:
                live.start()
                ticker = asyncio.create_task(_tick(live))
            live.refresh()
    except TrellisError as error:
        failure = error
    finally:
        if ticker is not None:
            ticker.cancel()
        if live.is_started:
            live.stop()
            console.print()  # the live view leaves the cursor on its last line
            if view.answer:
                console.print()  # a blank line between the answer and the totals
    if failure is None or view.finished is not None:
        for line in view.summary():
            console.print(line, highlight=False, soft_wrap=True)
    if failure is not None:
        raise failure
    return view


async def follow_to_end(
    events: AsyncIterator[executor_pb2.RunResponse],
    console: Console,
    *,
    as_json: bool,
    where: exits.Target,
    view: RunView | None = None,
) -> ExitCode:
    """Show a run's events to their end (live, or ``--json``); the run's exit code. An
    error after ``finished`` is printed and the run's status decides; an error before it
    is the caller's to report (``exits.reported``)."""
    view = RunView() if view is None else view
    try:
        if as_json:
            await print_json(events, view)
        else:
            await show_run(events, console, view)
    except TrellisError as error:
        if view.finished is None:
            raise
        exits.print_error(exits.describe(error, where))
    return exits.for_run(view.finished)
