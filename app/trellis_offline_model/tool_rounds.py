"""Function calling by rules: the goal's plan, one round of parallel tool calls at a time.

The rules plan the whole goal as usual (``planning.plan``: nodes that may depend on each
other); a function-calling model cannot write a dependency, so it calls, in each reply,
the nodes whose dependencies have their results in the conversation, with references
replaced by those results (``trellis.contract.refs``: the same syntax the executor
resolves). A node is done when the conversation already holds a call of its tool with
its resolved arguments. When nothing is left to call (or ``tool_choice`` is ``none``)
the reply is the answer, from every tool message of the conversation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trellis.contract.refs import resolve
from trellis.runtime.errors import TrellisError
from trellis_offline_model import answering, planning
from trellis_offline_model.conversation import ChatRequest, ToolTurn


@dataclass(frozen=True)
class Call:
    """A tool call to make: the function and its arguments (JSON text)."""

    name: str
    arguments: str


def _same(turn: ToolTurn, tool: str, args: dict[str, Any]) -> bool:
    return turn.name == tool and turn.args == args


def next_calls(request: ChatRequest) -> list[Call]:
    """The calls of the next round (empty: time to answer)."""
    if not request.may_call:
        return []
    turns = request.tool_turns()
    used: set[int] = set()
    outputs: dict[str, Any] = {}
    done: set[str] = set()
    failed: set[str] = set()
    calls: list[Call] = []
    for node in planning.plan(request.plan_goal(), request.catalog()):
        deps = node["depends_on"]
        if any(d in failed for d in deps) or not all(d in outputs for d in deps):
            if any(d in failed for d in deps):
                failed.add(node["node_id"])
            continue
        try:
            args = resolve(node["args"], outputs)
        except TrellisError:
            failed.add(node["node_id"])
            continue
        turn = next(
            (i for i, t in enumerate(turns) if i not in used and _same(t, node["tool"], args)),
            None,
        )
        if turn is None:
            calls.append(Call(node["tool"], json.dumps(args)))
            continue
        used.add(turn)
        done.add(node["node_id"])
        result = turns[turn].result or {}
        if str(result.get("status", "")).upper() == "SUCCEEDED":
            outputs[node["node_id"]] = result.get("output")
        elif result:
            failed.add(node["node_id"])
    return calls


def _outcomes(turns: Sequence[ToolTurn]) -> list[dict[str, Any]]:
    return [
        {"node_id": t.call_id, "tool": t.name, "args": t.args, **t.result}
        for t in turns
        if t.result is not None and t.result.get("status") not in ("ACCEPTED", "REJECTED")
    ]


def answer(request: ChatRequest) -> str:
    """The answer from the conversation's tool results (or, none: the tools there are)."""
    return answering.answer(request.goal(), _outcomes(request.tool_turns()), request.catalog())
