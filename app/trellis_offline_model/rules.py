"""The rule model's one entry point: a chat completions request in, a reply out.

Three ways to plan, chosen by the request, as a real server would be asked:

- ``tools`` (function calling): the next round's tool calls, or the answer
  (``tool_rounds``);
- a ``json_schema`` ``response_format`` holding a plan: one object ``{"nodes": [...]}``
  (with the strict schema's nulls for arguments it leaves out);
- otherwise, a catalog of tool specs in the messages: JSON Lines, one node per line.

Anything else is a fold of a session's turns (Summarize: a deterministic condensation,
``follow_up.py``), a join (the answer from the outcomes in the messages), or, without
outcomes or tools, a fixed notice. A turn of a session plans its goal made a goal of its
own from the earlier turns ("and multiply that by 3" after 2+2 is ``4 * 3``). A repair
round (accepted nodes after the model's own output) gets the part of the plan that was not accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trellis_offline_model import answering, follow_up, planning, tokens, tool_rounds
from trellis_offline_model.conversation import ChatRequest
from trellis_offline_model.tool_rounds import Call

MODEL_ID = "trellis-offline-rules-v1"
#: Size of a fold's condensation when the request sets no output limit.
FOLD_TOKENS = 500

FALLBACK = (
    f"{MODEL_ID} is a rule-based model, not an LLM: it only answers Trellis planning "
    "requests (with a tool catalog) and joins (with the outcomes of tool calls)."
)


@dataclass(frozen=True)
class Reply:
    """What the model says: text, or tool calls. ``plan`` holds the plan's units (a
    JSONL line or a node object each: streamed paced, one per ``line_delay_ms``) when
    the text is a plan; ``units`` joined with ``separators`` is the text."""

    text: str = ""
    tool_calls: tuple[Call, ...] = ()
    units: tuple[str, ...] = ()
    separators: tuple[str, ...] = ()

    @property
    def plan(self) -> bool:
        return bool(self.units) or bool(self.tool_calls)


def _next_id(previous: list[dict[str, Any]]) -> int:
    """The first ``n<k>`` number no node of a previous plan used."""
    numbers = [
        int(str(n.get("node_id"))[1:])
        for n in previous
        if re.fullmatch(r"n\d+", str(n.get("node_id")))
    ]
    return max(numbers, default=0) + 1


def _nodes(request: ChatRequest) -> list[dict[str, Any]]:
    previous = request.previous_plan()
    nodes = planning.plan(request.plan_goal(), request.catalog(), first_id=_next_id(previous))
    accepted = request.accepted()
    if accepted:
        nodes = planning.remaining(nodes, accepted, first_id=_next_id([*previous, *accepted]))
    return nodes


def _conform(args: Any, schema: Any) -> Any:
    """``args`` as a strict schema wants them: every property there, null when unused."""
    if not isinstance(args, dict) or not isinstance(schema, Mapping):
        return args
    properties = schema.get("properties")
    if not isinstance(properties, Mapping) or schema.get("additionalProperties") is not False:
        return args
    return {name: _conform(args.get(name), sub) for name, sub in properties.items()}


def _json_plan(request: ChatRequest, nodes: list[dict[str, Any]]) -> Reply:
    schemas = {t["name"]: t["input_schema"] for t in request.catalog()}
    units = []
    for node in nodes:
        if request.strict:
            node = {**node, "args": _conform(node["args"], schemas.get(node["tool"]))}
        units.append(json.dumps(node))
    if not units:
        return Reply(text='{"nodes": []}')
    separators = ('{"nodes": [\n', *[",\n"] * (len(units) - 1), "\n]}")
    text = separators[0] + "".join(u + s for u, s in zip(units, separators[1:], strict=True))
    return Reply(text=text, units=tuple(units), separators=separators)


def _jsonl_plan(nodes: list[dict[str, Any]]) -> Reply:
    lines = tuple(json.dumps(node) + "\n" for node in nodes)
    return Reply(text="".join(lines), units=lines, separators=("",) * (len(lines) + 1))


def render(body: Mapping[str, Any], nodes: list[dict[str, Any]]) -> Reply:
    """``nodes`` as the plan the request asks for: tool calls (their dependencies are
    not written: a function call cannot say them), a ``{"nodes": [...]}`` document, or
    JSON Lines."""
    request = ChatRequest(body)
    if request.function_calling:
        return Reply(tool_calls=tuple(Call(n["tool"], json.dumps(n["args"])) for n in nodes))
    if request.json_plan:
        return _json_plan(request, nodes)
    return _jsonl_plan(nodes)


def as_text(body: Mapping[str, Any], text: str) -> Reply:
    """``text`` as the reply; a JSON Lines plan's lines are its units (paced)."""
    request = ChatRequest(body)
    if request.function_calling or request.json_plan or not request.is_plan():
        return Reply(text=text)
    lines = tuple(tokens.lines(text))
    return Reply(text=text, units=lines, separators=("",) * (len(lines) + 1))


def respond(body: Mapping[str, Any]) -> Reply:
    """The reply to a request ``body`` (see the module docstring)."""
    request = ChatRequest(body)
    if request.function_calling:
        calls = tool_rounds.next_calls(request)
        if calls:
            return Reply(tool_calls=tuple(calls))
        return Reply(text=tool_rounds.answer(request))
    if request.json_plan:
        return _json_plan(request, _nodes(request))
    if request.is_plan():
        return _jsonl_plan(_nodes(request))
    fold = request.fold()
    if fold is not None:
        max_chars = (request.max_output_tokens or FOLD_TOKENS) * 4
        return Reply(text=follow_up.condense(fold[0], fold[1], max_chars))
    outcomes = request.outcomes()
    if outcomes or request.listed_tools():
        return Reply(text=answering.answer(request.goal(), outcomes, request.listed_tools()))
    return Reply(text=FALLBACK)
