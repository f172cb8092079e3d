"""``trellis chat`` in a pseudo-terminal (two turns, the second using the first's answer),
and ``trellis run --session``, ``trellis sessions list|show|delete`` and ``trellis costs
--session`` against the services as processes."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.support import pty_session
from tests.support.cli import TRELLIS, clean_env, trellis
from trellis.clients.executor import ExecutorClient
from trellis.runtime.errors import NotFound


def converse(args: list[str], script: list[tuple[str, str]], **env: str) -> dict:
    """``trellis ARGS`` in a pseudo-terminal, typed ``script``."""
    env = clean_env(COLUMNS="120", LINES="40", **env)
    return pty_session.converse([str(TRELLIS), *args], "you> ", script, env)


@pytest.fixture
async def stack(process_stack):
    return await process_stack()


async def test_chat_remembers_the_previous_turn(stack, channels) -> None:
    args = ["chat", "--target", stack.executor_target, "--session", "pty-chat"]
    script = [
        ("what is 2+2", r"2\+2 = 4"),
        ("and multiply that by 3", r"4 \* 3 = 12"),
        ("/cost", r"2 turns"),
        ("/history", r"#2 \S*succeeded"),
    ]
    result = await asyncio.to_thread(converse, args, script)
    assert result["done"] == len(script), result["output"]
    assert result["code"] == 0, result["output"]
    session = await ExecutorClient(channels.get(stack.executor_target)).get_session("pty-chat")
    assert [t.goal for t in session.turns] == ["what is 2+2", "and multiply that by 3"]
    assert "12" in session.turns[1].answer


async def test_chat_new_starts_another_session(stack) -> None:
    args = ["chat", "--target", stack.executor_target]
    script = [
        ("what is 5+5", r"5\+5 = 10"),
        ("/new", r"session chat-[0-9a-f]{12}"),
        ("/cost", r"no turns yet"),
    ]
    result = await asyncio.to_thread(converse, args, script)
    assert result["done"] == len(script), result["output"]


async def test_run_session_then_list_show_delete_and_costs(stack, channels) -> None:
    target = ["--target", stack.executor_target]
    first = await trellis("run", "what is 2+2", "--session", "cli-s", *target)
    assert first.code == 0, first
    second = await trellis("run", "and multiply that by 3", "--session", "cli-s", *target)
    assert second.code == 0 and "4 * 3 = 12" in second.stdout, second

    listed = await trellis("sessions", "list", *target)
    assert listed.code == 0 and re.search(r"cli-s\s+2\b", listed.stdout), listed
    shown = await trellis("sessions", "show", "cli-s", *target)
    assert shown.code == 0 and "and multiply that by 3" in shown.stdout, shown
    run_id = re.search(r"run_id: (\S+)", second.stdout).group(1)
    run_shown = await trellis("runs", "show", run_id, *target)
    assert "session: cli-s" in run_shown.stdout, run_shown
    as_json = await trellis("sessions", "show", "cli-s", "--json", *target)
    assert json.loads(as_json.stdout)["session_id"] == "cli-s"

    costs = await trellis(
        "costs", "--session", "cli-s", "--json", "--target", stack.target("costs")
    )
    assert costs.code == 0, costs
    assert json.loads(costs.stdout)["total_input_tokens"] > 0, costs.stdout
    none = await trellis(
        "costs", "--session", "nobody", "--json", "--target", stack.target("costs")
    )
    assert json.loads(none.stdout)["total_input_tokens"] == 0, none.stdout

    deleted = await trellis("sessions", "delete", "cli-s", *target)
    assert deleted.code == 0 and "2 turns" in deleted.stderr, deleted
    session = await ExecutorClient(channels.get(stack.executor_target)).get_session("cli-s")
    assert session.deleted and all(not t.goal and not t.answer for t in session.turns)

    missing = await trellis("sessions", "show", "nope", *target)
    assert missing.code == 1 and "no session nope" in missing.stderr, missing
    with pytest.raises(NotFound):
        await ExecutorClient(channels.get(stack.executor_target)).get_session("nope")
