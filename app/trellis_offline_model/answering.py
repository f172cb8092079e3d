"""Answering by rules: goal + node outcomes -> a short, deterministic answer.

One intro line, then one bullet per node: the first lines of a command's stdout, an
expression's result, a failed node's error, a skipped node's reason. It never asks for
another plan; tests that need a REPLAN script one. When no tool ran, the answer says so
and lists the tools there are (``nothing_matches``), in whatever language the goal was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

MAX_LINES = 3
MAX_CHARS = 240


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"


def _first_lines(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _clip(" / ".join(lines[:MAX_LINES])) if lines else "(no output)"


def summarize(output: Any) -> str:
    """The gist of a tool output, whatever its shape."""
    if isinstance(output, str):
        return _first_lines(output)
    if isinstance(output, Mapping):
        stdout = output.get("stdout")
        if isinstance(stdout, str) and stdout.strip():
            return _first_lines(stdout)
        stderr = output.get("stderr")
        if isinstance(stderr, str) and stderr.strip():
            return _first_lines(stderr)
        for key in ("result", "value", "output", "text"):
            if key in output:
                return summarize(output[key])
    if output is None:
        return "(no output)"
    return _clip(json.dumps(output, sort_keys=True, ensure_ascii=False))


def _call(outcome: Mapping[str, Any]) -> str:
    args = outcome.get("args") if isinstance(outcome.get("args"), Mapping) else {}
    tool = str(outcome.get("tool") or "")
    if isinstance(args.get("command"), str):
        return f"`{args['command']}`"
    if isinstance(args.get("expression"), str):
        return str(args["expression"])
    if not tool:
        return str(outcome.get("node_id", "?"))
    return f"{tool} {_clip(json.dumps(args, sort_keys=True))}" if args else tool


def _error(outcome: Mapping[str, Any]) -> str:
    error = outcome.get("error")
    if isinstance(error, Mapping):
        code, message = error.get("code") or "", error.get("message") or ""
        return _clip(f"{code}: {message}" if code and message else code or message)
    return _clip(str(error)) if error else "no details"


def bullet(outcome: Mapping[str, Any]) -> str:
    status = str(outcome.get("status", "")).upper().removeprefix("NODE_STATUS_")
    call = _call(outcome)
    if status == "SUCCEEDED":
        if "expression" in (outcome.get("args") or {}):
            return f"- {call} = {summarize(outcome.get('output'))}"
        return f"- {call}: {summarize(outcome.get('output'))}"
    if status == "FAILED":
        return f"- {call} failed ({_error(outcome)})"
    if status == "SKIPPED":
        return f"- {call} was skipped because a call it depends on failed"
    if status == "CANCELLED":
        return f"- {call} was cancelled"
    return f"- {call}: status {status or 'unknown'}"


#: Tools listed, at most, when nothing matched.
MAX_LISTED = 20
NO_MATCH = (
    "No available tool matches this goal, so there is nothing to report. This is a "
    "rule-based model: it plans a tool when the goal's words match the tool's name and "
    "description (in English), and fills its arguments from quoted text, numbers, paths "
    "and URLs in the goal."
)


def _first_sentence(text: str) -> str:
    line = " ".join(text.split())
    end = line.find(". ")
    return _clip(line if end < 0 else line[: end + 1])


def nothing_matches(tools: Iterable[Mapping[str, Any]]) -> str:
    """The answer when no tool ran: say so, and list the tools (name and what it does)."""
    listed = [t for t in tools if t.get("name")]
    if not listed:
        return NO_MATCH
    lines = [NO_MATCH, "", "The tools available:"]
    for tool in listed[:MAX_LISTED]:
        description = _first_sentence(str(tool.get("description") or ""))
        lines.append(f"- {tool['name']}: {description}" if description else f"- {tool['name']}")
    if len(listed) > MAX_LISTED:
        lines.append(f"- and {len(listed) - MAX_LISTED} more")
    return "\n".join(lines)


def answer(
    goal: str, outcomes: Iterable[Mapping[str, Any]], tools: Iterable[Mapping[str, Any]] = ()
) -> str:
    bullets = [bullet(o) for o in outcomes]
    if not bullets:
        return nothing_matches(tools)
    intro = f"Results for: {_clip(goal)}" if goal else "Results:"
    return "\n".join([intro, *bullets])
