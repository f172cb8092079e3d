"""A session's context as the planner's prompts carry it, and its budget.

Shared by the executor (it builds the context from the stored turns and decides when it
is over ``TRELLIS_SESSION_CONTEXT_TOKENS``) and the planner (it renders the context into
every prompt of a turn and, asked to fold, picks the oldest turns to summarise), so both
count the same text the same way (``trellis.runtime.tokens``).

Rendering: one JSON object per line - first ``{"summary": ..., "through_turn": k}`` when
the session has a summary, then one ``{"turn": n, "goal": ..., "answer": ..., "results":
[...]}`` per turn after it, oldest first. A turn's tool results are compact: tool, status
and the output (or error) as JSON text cut to ``MAX_RESULT_CHARS``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import from_value
from trellis.runtime.tokens import estimate_tokens

#: Longest output (JSON text) of one earlier tool call in the context.
MAX_RESULT_CHARS = 300
#: Longest answer of an earlier turn in the context.
MAX_ANSWER_CHARS = 2000
#: After a fold the turns kept take at most this share of the budget, so the next
#: turns fit for a while and the summary is reused, not recomputed at every turn.
KEEP_SHARE = 0.5


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "...[truncated]"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def compact_result(
    call: common_pb2.ToolCall, outcome: common_pb2.NodeOutcome
) -> planner_pb2.TurnResult:
    """What the context keeps of one tool call of an earlier turn."""
    status = common_pb2.NodeStatus.Name(outcome.status).removeprefix("NODE_STATUS_")
    if outcome.HasField("output"):
        text = _json(from_value(outcome.output))
    else:
        text = outcome.error.message or outcome.error.code
    return planner_pb2.TurnResult(
        tool=call.tool, status=status, output=_cut(text, MAX_RESULT_CHARS)
    )


def turn_line(turn: planner_pb2.ContextTurn) -> str:
    line: dict[str, Any] = {
        "turn": turn.number,
        "goal": turn.goal,
        "answer": _cut(turn.answer, MAX_ANSWER_CHARS),
    }
    if turn.results:
        line["results"] = [
            {"tool": r.tool, "status": r.status, "output": r.output} for r in turn.results
        ]
    return _json(line)


def summary_line(summary: str, through_turn: int) -> str:
    return _json({"summary": summary, "through_turn": through_turn})


def context_lines(context: planner_pb2.SessionContext) -> list[str]:
    """The context's lines: the summary (if any), then each turn."""
    lines = []
    if context.summary:
        lines.append(summary_line(context.summary, context.summary_through_turn))
    lines.extend(turn_line(turn) for turn in context.turns)
    return lines


def lines_tokens(lines: Iterable[str]) -> int:
    return estimate_tokens("\n".join(lines))


def context_tokens(context: planner_pb2.SessionContext) -> int:
    """The estimated tokens the context takes in a prompt."""
    return lines_tokens(context_lines(context))


def fold_count(context: planner_pb2.SessionContext, max_tokens: int) -> int:
    """How many of the oldest turns to fold into the summary: 0 when the context fits
    ``max_tokens``; else enough that the turns kept take at most ``KEEP_SHARE`` of it
    (the newest turn is always kept)."""
    if context_tokens(context) <= max_tokens:
        return 0
    lines = [turn_line(turn) for turn in context.turns]
    keep_budget = int(max_tokens * KEEP_SHARE)
    fold = 0
    while fold < len(lines) - 1 and lines_tokens(lines[fold:]) > keep_budget:
        fold += 1
    return max(fold, 1) if len(lines) > 1 else 0
