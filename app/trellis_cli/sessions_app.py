"""``trellis sessions``: conversations (sessions) against the executor.

``list`` pages through ListSessions (most recently active first) up to ``--limit``;
``show`` is one session (GetSession): its turns (goal, status, answer), its summary and
its totals; ``delete`` erases the stored content of its turns (DeleteSession).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis_cli import exits
from trellis_cli.executor_call import DEFAULT_TARGET, ApiKey, Json, Target, Tenant, call
from trellis_cli.runs import to_json
from trellis_cli.runs_app import Timeout, _local, status_name
from trellis_cli.view import STATE_STYLE

console = Console()
sessions_app = typer.Typer(
    help="Sessions (conversations): list, show and delete them.", no_args_is_help=True
)


async def collect(
    client: ExecutorClient, limit: int
) -> tuple[list[executor_pb2.SessionSummary], bool]:
    """Up to ``limit`` sessions, page after page; and whether there are more."""
    sessions: list[executor_pb2.SessionSummary] = []
    token = ""
    while True:
        page = await client.list_sessions(min(limit - len(sessions), 1000), token)
        sessions.extend(page.sessions)
        if not page.next_page_token or len(sessions) >= limit:
            return sessions[:limit], bool(page.next_page_token)
        token = page.next_page_token


def _cost(nano_usd: int) -> str:
    return f"${nano_usd / 1e9:.6f}"


@sessions_app.command("list")
def list_sessions(
    limit: Annotated[int, typer.Option(min=1, help="Most sessions to show.")] = 20,
    as_json: Json = False,
    target: Target = DEFAULT_TARGET,
    api_key: ApiKey = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: Timeout = 30.0,
) -> None:
    """The tenant's sessions, most recently active first: id, turns, last activity, cost,
    last goal."""
    sessions, more = call(target, api_key, tenant, timeout, lambda c: collect(c, limit))
    if as_json:
        for session in sessions:
            typer.echo(to_json(session))
        return
    if not sessions:
        console.print("no sessions", highlight=False)
        return
    table = Table(box=None, pad_edge=False, expand=True, header_style="bold")
    for name in ("session", "turns", "active", "cost"):
        table.add_column(name, no_wrap=True)
    table.add_column("last goal", ratio=1, no_wrap=True, overflow="ellipsis", min_width=8)
    for s in sessions:
        goal = "(deleted)" if s.deleted else " ".join(s.last_goal.split())
        table.add_row(
            s.session_id,
            str(s.turn_count),
            _local(s.updated_at, wide=console.width >= 100),
            _cost(s.cost_nano_usd),
            goal,
        )
    console.print(table)
    if more:
        console.print(f"[dim]the {len(sessions)} most recent shown; --limit N shows more[/]")


def print_session(session: executor_pb2.Session, out: Console) -> None:
    """A session's turns (goal, status, answer), summary and totals."""
    state = "deleted" if session.deleted else f"{len(session.turns)} turns"
    out.print(f"[bold]session {session.session_id}[/] — {state}", highlight=False)
    if session.summary:
        out.print(
            f"[dim]summary of turns 1-{session.summary_through_turn}:[/] {session.summary}",
            highlight=False,
        )
    for turn in session.turns:
        status = status_name(turn.status)
        out.print(
            Text.assemble(
                (f"#{turn.number} ", "bold"),
                (status, STATE_STYLE.get(status, "")),
                f"  {turn.run_id}",
            )
        )
        if turn.goal:
            out.print(f"  > {turn.goal}", highlight=False)
        if turn.answer:
            for line in turn.answer.splitlines():
                out.print(f"    {line}", highlight=False)
    tokens = session.usage.input_tokens + session.usage.output_tokens
    out.print(f"tokens {tokens:,} · cost {_cost(session.cost_nano_usd)}", highlight=False)


@sessions_app.command("show")
def show(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="The Session as proto3 JSON.")] = False,
    target: Target = DEFAULT_TARGET,
    api_key: ApiKey = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: Timeout = 30.0,
) -> None:
    """One session: each turn's goal, status and answer, the summary, tokens and cost."""
    session = call(target, api_key, tenant, timeout, lambda c: c.get_session(session_id))
    if as_json:
        typer.echo(to_json(session))
        return
    print_session(session, console)


@sessions_app.command("delete")
def delete(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    target: Target = DEFAULT_TARGET,
    api_key: ApiKey = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: Timeout = 30.0,
) -> None:
    """Erase a session's goals, answers, tool arguments and outputs and its summary (the
    ledger keeps its costs). Refused while a turn runs (SESSION_BUSY)."""
    turns = call(target, api_key, tenant, timeout, lambda c: c.delete_session(session_id))
    exits.stderr.print(f"session {session_id} deleted: the content of {turns} turns erased")
