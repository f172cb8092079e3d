"""Answering by rules: goal + node outcomes -> a short, deterministic answer.

One intro line, then one bullet per node: the first lines of a command's stdout, an
expression's result, a failed node's error, a skipped node's reason. It never asks for
another plan; tests that need a REPLAN script one.
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


def answer(goal: str, outcomes: Iterable[Mapping[str, Any]]) -> str:
    bullets = [bullet(o) for o in outcomes]
    if not bullets:
        return "No available tool matches this goal, so there is nothing to report."
    intro = f"Results for: {_clip(goal)}" if goal else "Results:"
    return "\n".join([intro, *bullets])
