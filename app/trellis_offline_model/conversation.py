"""Reading a chat completions request the way the rules need it: no prompt headings.

The rules never read the planner's prose or its ``## `` headings. What they read:

- the tool catalog: the request's ``tools`` (function calling), else the branches of its
  ``response_format`` JSON Schema (one per tool: the tool name as an enum, the tool's
  description, its args schema), else the JSON objects in the system message that look
  like tool specs (``name`` and ``input_schema``: JSON Lines plans list them so);
- the goal: the first user message; on a turn of a session, made a goal of its own from
  the earlier turns in the system message (``follow_up.py``: "and multiply that by 3");
- JSON objects, one per line, in the messages: tool calls (``node_id``, ``tool``: an
  earlier round's plan before the last assistant message, a repair round's accepted
  nodes after it), outcomes (``node_id``, ``status``: what a join answers from) and
  tools named without a schema (``name``, ``description``: the catalog a join without
  outcomes lists);
- the function-calling conversation: each assistant tool call and the ``tool`` message
  that answers it (its content JSON: ``status``, ``output`` or ``error``).

A request is a plan when it carries a catalog (``tools``, a plan schema, or tool specs);
anything else is answered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trellis_offline_model import follow_up

Tool = dict[str, Any]


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one chat message: a string, or the text parts of a content list."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return ""


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of ``text``, one per line; other lines are prose and skipped."""
    objects = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def _is_call(value: Mapping[str, Any]) -> bool:
    return "node_id" in value and "tool" in value and "status" not in value


def _function_tools(tools: Any) -> list[Tool]:
    out = []
    for entry in tools if isinstance(tools, list) else []:
        function = entry.get("function") if isinstance(entry, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            out.append(
                {
                    "name": function["name"],
                    "description": str(function.get("description") or ""),
                    "input_schema": function.get("parameters") or {},
                }
            )
    return out


def _schema_tools(response_format: Any) -> list[Tool] | None:
    """The tools of a plan schema (``{"nodes": [one branch per tool]}``); None if the
    request has no JSON Schema response format."""
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    items = (((schema.get("properties") or {}).get("nodes") or {}).get("items")) or {}
    branches = items.get("anyOf") or ([items] if items else [])
    out = []
    for branch in branches:
        properties = branch.get("properties") or {}
        tool = properties.get("tool") or {}
        names = tool.get("enum") or ([tool["const"]] if "const" in tool else [])
        out.extend(
            {
                "name": str(name),
                "description": str(branch.get("description") or ""),
                "input_schema": properties.get("args") or {},
            }
            for name in names
        )
    return out


@dataclass(frozen=True)
class ToolTurn:
    """One tool call of the conversation, and what its tool message said (None: none)."""

    call_id: str
    name: str
    args: dict[str, Any]
    result: dict[str, Any] | None


@dataclass
class ChatRequest:
    """A request body, read."""

    body: Mapping[str, Any]
    messages: list[Mapping[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.messages = [m for m in self.body.get("messages") or [] if isinstance(m, Mapping)]

    @property
    def function_calling(self) -> bool:
        return "tools" in self.body

    @property
    def json_plan(self) -> bool:
        return _schema_tools(self.body.get("response_format")) is not None

    @property
    def strict(self) -> bool:
        schema = (self.body.get("response_format") or {}).get("json_schema") or {}
        return bool(schema.get("strict"))

    @property
    def may_call(self) -> bool:
        return self.body.get("tool_choice") != "none"

    def catalog(self) -> list[Tool]:
        if self.function_calling:
            return _function_tools(self.body.get("tools"))
        schema_tools = _schema_tools(self.body.get("response_format"))
        if schema_tools is not None:
            return schema_tools
        return [o for o in self._objects("system") if "name" in o and "input_schema" in o]

    def is_plan(self) -> bool:
        return self.function_calling or self.json_plan or bool(self.catalog())

    def goal(self) -> str:
        users = [message_text(m) for m in self.messages if m.get("role") == "user"]
        return users[0].strip() if users else ""

    def session_turns(self) -> list[dict[str, Any]]:
        """A session turn's earlier turns (the system message's ``turn`` lines)."""
        return [o for o in self._objects("system") if "turn" in o and "goal" in o]

    def plan_goal(self) -> str:
        """The goal, made a goal of its own when it follows up the previous turn."""
        return follow_up.resolve(self.goal(), self.session_turns())

    def fold(self) -> tuple[str, list[dict[str, Any]]] | None:
        """A Summarize request's previous summary and turns to fold (None: not one)."""
        if self.is_plan():
            return None
        objects = self._objects("user")
        turns = [o for o in objects if "turn" in o and "goal" in o]
        if not turns:
            return None
        summary = next((str(o["summary"]) for o in objects if "summary" in o), "")
        return summary, turns

    @property
    def max_output_tokens(self) -> int | None:
        for key in ("max_completion_tokens", "max_tokens"):
            value = self.body.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _objects(self, role: str | None = None, start: int = 0, end: int | None = None) -> list:
        out: list[dict[str, Any]] = []
        for message in self.messages[start:end]:
            if role is None or message.get("role") == role:
                out.extend(json_lines(message_text(message)))
        return out

    def _last_assistant(self) -> int:
        roles = [m.get("role") for m in self.messages]
        return max((i for i, r in enumerate(roles) if r == "assistant"), default=-1)

    def previous_plan(self) -> list[dict[str, Any]]:
        """Tool calls of earlier rounds (before the last assistant message)."""
        end = self._last_assistant()
        return [o for o in self._objects("user", 0, end if end >= 0 else None) if _is_call(o)]

    def accepted(self) -> list[dict[str, Any]]:
        """A repair round's accepted nodes (after the last assistant message)."""
        last = self._last_assistant()
        if last < 0:
            return []
        return [o for o in self._objects("user", last + 1) if _is_call(o)]

    def outcomes(self) -> list[dict[str, Any]]:
        return [o for o in self._objects("user") if "node_id" in o and "status" in o]

    def listed_tools(self) -> list[dict[str, Any]]:
        """Tools a join names without their schema (no tool ran)."""
        return [
            o
            for o in self._objects("user")
            if "name" in o and "description" in o and "input_schema" not in o
        ]

    def tool_turns(self) -> list[ToolTurn]:
        """Every tool call of the conversation, in order, with its tool message."""
        results: dict[str, dict[str, Any]] = {}
        for message in self.messages:
            if message.get("role") == "tool":
                try:
                    content = json.loads(message_text(message))
                except ValueError:
                    content = {"status": "SUCCEEDED", "output": message_text(message)}
                if not isinstance(content, dict):
                    content = {"status": "SUCCEEDED", "output": content}
                results[str(message.get("tool_call_id"))] = content
        turns = []
        for message in self.messages:
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                try:
                    args = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    args = {}
                call_id = str(call.get("id"))
                turns.append(
                    ToolTurn(
                        call_id,
                        str(function.get("name")),
                        args if isinstance(args, dict) else {},
                        results.get(call_id),
                    )
                )
        return turns
