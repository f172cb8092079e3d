"""``trellis chat``: a conversation, one turn per line, in one session.

Each line is a Run of the session (``RunRequest.session_id``) shown with ``trellis
run``'s live view, so the planner sees the earlier turns and a follow-up ("and multiply
that by 3") works - with the offline model too. Commands: ``/new`` starts another
session, ``/cost`` shows the session's tokens and cost, ``/history`` its turns,
``/exit`` (or end of input) leaves. Against ``--target``, or, without one, the embedded
stack (``trellis demo``'s: the offline model unless OPENAI_* name another).

Ctrl-C during a turn cancels that turn (the run is cancelled) and the chat goes on;
at the prompt it leaves (exit 130). An error of a turn (SESSION_BUSY, a refused key) is
one line; the chat goes on.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
from trellis_cli import exits
from trellis_cli.executor_call import ApiKey, Tenant, executor
from trellis_cli.exits import EXIT_INTERRUPTED, ExitCode
from trellis_cli.model_choice import ModelChoiceError, model_choice
from trellis_cli.runs import Interrupted, follow_to_end, until_interrupted
from trellis_cli.sessions_app import print_session

console = Console()
HELP = "/new: another session · /cost · /history · /exit"
PROMPT = "you> "


def new_session_id() -> str:
    return f"chat-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def _client(
    target: str,
    api_key: str,
    tenant: str,
    timeout: float,  # noqa: ASYNC109 - the calls' deadline, not a wait of this function
) -> AsyncIterator[tuple[ExecutorClient, exits.Target]]:
    """The executor at ``target``, or the embedded stack's when ``target`` is empty."""
    if target:
        async with executor(target, api_key, tenant, timeout) as client:
            yield client, exits.Target("executor", target, "--target/TRELLIS_EXECUTOR_TARGET")
        return
    from trellis_cli.stack import start_stack  # imports every service: only for embedded

    try:
        choice = model_choice(os.environ)
    except ModelChoiceError as error:
        raise exits.fail(str(error), ExitCode.USAGE) from None
    try:
        stack = await start_stack(
            database_url=os.environ.get("TRELLIS_DATABASE_URL", DEFAULT_DATABASE_URL),
            model_base_url=choice.base_url,
            model_delay_ms=2,
        )
    except StartupError as error:
        raise exits.fail(str(error), ExitCode.USAGE) from None
    console.print(f"[bold]Trellis embedded stack[/] — {choice.describe()}", highlight=False)
    try:
        async with executor(stack.executor_target, "", tenant, timeout) as client:
            yield client, exits.Target("embedded executor", stack.executor_target)
    finally:
        await stack.stop()


async def _read_line() -> str | None:
    """The next line typed (None at end of input)."""
    try:
        return await asyncio.to_thread(input, PROMPT)
    except EOFError:
        return None


async def _cost(client: ExecutorClient, session_id: str) -> None:
    try:
        session = await client.get_session(session_id)
    except NotFound:
        console.print("no turns yet", highlight=False)
        return
    usage = session.usage
    console.print(
        f"session {session_id}: {len(session.turns)} turns · tokens {usage.input_tokens:,} in,"
        f" {usage.output_tokens:,} out · cost ${session.cost_nano_usd / 1e9:.6f}",
        highlight=False,
    )


async def _history(client: ExecutorClient, session_id: str) -> None:
    try:
        print_session(await client.get_session(session_id), console)
    except NotFound:
        console.print("no turns yet", highlight=False)


async def _turn(client: ExecutorClient, goal: str, session_id: str, target: exits.Target) -> None:
    request = executor_pb2.RunRequest(goal=goal, session_id=session_id, run_id=uuid.uuid4().hex)
    try:
        await until_interrupted(
            follow_to_end(client.run(request), console, as_json=False, where=target)
        )
    except Interrupted:
        try:
            await client.cancel_run(request.run_id)
        except TrellisError:
            pass
        console.print(f"turn cancelled (run {request.run_id})", highlight=False)
    except TrellisError as error:
        exits.print_error(exits.describe(error, target))


async def converse(client: ExecutorClient, target: exits.Target, session_id: str) -> ExitCode:
    """The prompt loop; its exit code."""
    console.print(f"session {session_id} — {HELP}", highlight=False)
    while True:
        try:
            line = await _read_line()
        except (KeyboardInterrupt, asyncio.CancelledError):
            return EXIT_INTERRUPTED
        if line is None:
            return ExitCode.SUCCEEDED
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return ExitCode.SUCCEEDED
        if line == "/new":
            session_id = new_session_id()
            console.print(f"session {session_id}", highlight=False)
        elif line == "/cost":
            await _cost(client, session_id)
        elif line == "/history":
            await _history(client, session_id)
        elif line.startswith("/"):
            console.print(f"unknown command {line.split()[0]} — {HELP}", highlight=False)
        else:
            await _turn(client, line, session_id, target)


def chat(
    target: Annotated[
        str,
        typer.Option(
            envvar="TRELLIS_EXECUTOR_TARGET",
            help="gRPC target (host:port) of the executor; empty: start the embedded stack.",
        ),
    ] = "",
    session: Annotated[str, typer.Option(help="Continue this session; default: a new one.")] = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    api_key: ApiKey = "",
    timeout: Annotated[float, typer.Option(help="Seconds each turn may take.")] = 300.0,
) -> None:
    """Talk to the agent: each line is a turn of one session, shown live; the planner
    sees the earlier turns. /new, /cost, /history, /exit."""
    setup_logging(os.environ.get("TRELLIS_LOG_LEVEL", "warning"))

    async def main() -> ExitCode:
        async with _client(target, api_key, tenant, timeout) as (client, where):
            with exits.reported(where):
                return await converse(client, where, session or new_session_id())

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    raise typer.Exit(code)
