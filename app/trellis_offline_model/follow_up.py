"""Follow-ups and memory by rules: a goal that refers to the previous turn, and folds.

A turn of a session carries the conversation so far in its system message (JSON lines:
``{"turn": n, "goal", "answer", "results"}``, and ``{"summary": ...}`` first when older
turns were folded). The rules read it for two things:

- ``resolve``: a goal that continues the previous turn becomes a goal of its own, which
  the planning rules then read as usual. Arithmetic on the previous result ("and
  multiply that by 3", "add 5 to it", "that plus 2") becomes an expression on the
  previous turn's number (its last numeric tool output, else the last number of its
  answer): ``4 * 3``. "the same for X" / "what about X" / "and for X" repeats the
  previous goal with X in place of its last path or name. Anything else is kept.
- ``condense``: a fold (Summarize) is a deterministic condensation: the previous summary's
  lines, then one line per folded turn (``Turn n: goal -> answer``), the oldest lines
  dropped beyond ``max_chars``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trellis_offline_model.matching import GoalValues

_NUM = r"(-?\d+(?:\.\d+)?)"
_REF = r"(?:that|it|this|the\s+result|the\s+answer|the\s+number)"
_ARITHMETIC = [
    (re.compile(rf"\bmultipl(?:y|ied)\s+(?:{_REF}\s+)?by\s+{_NUM}", re.I), "*"),
    (re.compile(rf"\bdivide(?:d)?\s+(?:{_REF}\s+)?by\s+{_NUM}", re.I), "/"),
    (re.compile(rf"\badd\s+{_NUM}(?:\s+to\s+{_REF})?", re.I), "+"),
    (re.compile(rf"\bsubtract\s+{_NUM}(?:\s+from\s+{_REF})?", re.I), "-"),
    (re.compile(rf"\b{_REF}\s+(?:times|multiplied\s+by|\*)\s*{_NUM}", re.I), "*"),
    (re.compile(rf"\b{_REF}\s+(?:plus|\+)\s*{_NUM}", re.I), "+"),
    (re.compile(rf"\b{_REF}\s+(?:minus|-)\s*{_NUM}", re.I), "-"),
    (re.compile(rf"\b{_REF}\s+(?:divided\s+by|/)\s*{_NUM}", re.I), "/"),
    (re.compile(rf"\bdouble\s+{_REF}", re.I), "*2"),
]
_SAME_FOR = re.compile(
    r"^\s*(?:and\s+|now\s+)?(?:(?:do\s+)?the\s+same\s+(?:for|with)|what\s+about|how\s+about"
    r"|and\s+for|now\s+for)\s+(.+?)\s*[?.!]*\s*$",
    re.I,
)
_ANY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

Turn = Mapping[str, Any]


def _number_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return format(value, "g") if isinstance(value, float) else str(value)
    if isinstance(value, str):
        try:
            return _number_of(json.loads(value))
        except ValueError:
            found = _ANY_NUMBER.findall(value)
            return found[-1] if len(found) == 1 else None
    if isinstance(value, Mapping):
        for key in ("result", "value", "output"):
            if key in value:
                return _number_of(value[key])
    return None


def previous_number(turn: Turn) -> str | None:
    """The number a follow-up's "that" means: the turn's last numeric tool output, else
    the last number of its answer."""
    for result in reversed(turn.get("results") or []):
        if isinstance(result, Mapping) and result.get("status") == "SUCCEEDED":
            if (number := _number_of(result.get("output"))) is not None:
                return number
    numbers = _ANY_NUMBER.findall(str(turn.get("answer") or ""))
    return numbers[-1] if numbers else None


def _replace_last_value(goal: str, new: str) -> str | None:
    values = GoalValues.of(goal)
    for old in [*reversed(values.paths), *reversed(values.names), *reversed(values.quoted)]:
        index = goal.rfind(old)
        if index >= 0:
            return goal[:index] + new + goal[index + len(old) :]
    return None


def resolve(goal: str, turns: Sequence[Turn]) -> str:
    """``goal`` as a goal of its own (see the module docstring)."""
    if not turns:
        return goal
    last = turns[-1]
    for pattern, operator in _ARITHMETIC:
        match = pattern.search(goal)
        if match is None:
            continue
        number = previous_number(last)
        if number is None:
            return goal
        if operator == "*2":
            return f"{number} * 2"
        return f"{number} {operator} {match.group(1)}"
    same = _SAME_FOR.match(goal)
    if same:
        replaced = _replace_last_value(str(last.get("goal") or ""), same.group(1))
        if replaced:
            return replaced
    return goal


def _line(turn: Turn) -> str:
    answer = " ".join(str(turn.get("answer") or "").split())
    goal = " ".join(str(turn.get("goal") or "").split())
    text = f"Turn {turn.get('turn')}: {goal} -> {answer}"
    return text if len(text) <= 160 else text[:159] + "…"


def condense(summary: str, turns: Sequence[Turn], max_chars: int) -> str:
    """The previous summary's lines and one line per turn, the newest ``max_chars``."""
    lines = [line for line in summary.splitlines() if line.strip()]
    lines.extend(_line(turn) for turn in turns)
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        if size + len(line) + 1 > max_chars:
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(reversed(kept))
