"""Reading the prompts Trellis's planner writes: message text and "## " sections.

The planner and this model agree on a few section headings (and nothing else): the
planning system prompt lists the catalog under ``## Tools`` as one JSON object per line
(name, description, input_schema); the join prompt gives ``## Goal`` and, under
``## Outcomes``, one JSON object per line per node; a replan adds ``## Previous plan``;
a repair round (after an invalid plan) adds ``## Accepted nodes``, one ToolCall per line.
An LLM reads the same text as prose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

TOOLS = "Tools"
GOAL = "Goal"
OUTCOMES = "Outcomes"
#: On a replan, the plan that ran before (its node ids are not reused).
PREVIOUS_PLAN = "Previous plan"
#: On a repair round, the nodes of the plan that were accepted (the rest is asked for).
ACCEPTED = "Accepted nodes"

_HEADING = re.compile(r"^##\s+(.+?)\s*$")


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one chat message: a string, or the text parts of a content list."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return ""


def sections(text: str) -> dict[str, str]:
    """Heading -> body of every ``## Heading`` section in ``text`` (first one wins)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            name = heading.group(1)
            current = None if name in found else found.setdefault(name, [])
            continue
        if current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in found.items()}


def json_lines(body: str) -> list[dict[str, Any]]:
    """The JSON objects of a section body, one per line; other lines are prose and skipped."""
    objects = []
    for line in body.splitlines():
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


class Prompt:
    """A chat request's messages, with the sections of all of them merged."""

    def __init__(self, messages: Sequence[Mapping[str, Any]]) -> None:
        self.messages = list(messages)
        self.sections: dict[str, str] = {}
        for message in self.messages:
            for name, body in sections(message_text(message)).items():
                self.sections.setdefault(name, body)

    def texts(self, role: str | None = None) -> list[str]:
        return [message_text(m) for m in self.messages if role is None or m.get("role") == role]

    def goal(self) -> str:
        """The ``## Goal`` section, else the first user message."""
        if GOAL in self.sections:
            return self.sections[GOAL]
        users = self.texts("user")
        return users[0].strip() if users else ""
