"""The rule model's one entry point: chat messages in, completion text out."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trellis_offline_model import answering, planning
from trellis_offline_model.prompt import (
    ACCEPTED,
    OUTCOMES,
    PREVIOUS_PLAN,
    TOOLS,
    Prompt,
    json_lines,
)

MODEL_ID = "trellis-offline-rules-v1"

FALLBACK = (
    f"{MODEL_ID} is a rule-based model, not an LLM: it only answers Trellis planning "
    f"prompts (with a '## {TOOLS}' section) and join prompts (with a '## {OUTCOMES}' section)."
)


def is_plan_prompt(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``messages`` ask for a plan (a tool catalog, no outcomes to join)."""
    sections = Prompt(messages).sections
    return TOOLS in sections and OUTCOMES not in sections


def respond(messages: Sequence[Mapping[str, Any]]) -> str:
    """The completion for ``messages``: a JSONL plan, an answer, or a fixed notice.

    On a repair round (``## Accepted nodes``) the plan is the rest the accepted nodes lack.
    """
    prompt = Prompt(messages)
    if OUTCOMES in prompt.sections:
        return answering.answer(prompt.goal(), json_lines(prompt.sections[OUTCOMES]))
    if TOOLS in prompt.sections:
        previous = json_lines(prompt.sections.get(PREVIOUS_PLAN, ""))
        nodes = planning.plan(
            prompt.goal(), json_lines(prompt.sections[TOOLS]), first_id=_next_id(previous)
        )
        if ACCEPTED in prompt.sections:
            accepted = json_lines(prompt.sections[ACCEPTED])
            nodes = planning.remaining(nodes, accepted, first_id=_next_id([*previous, *accepted]))
        return "".join(json.dumps(node) + "\n" for node in nodes)
    return FALLBACK


def _next_id(previous: list[dict[str, Any]]) -> int:
    """The first ``n<k>`` number no node of a previous plan used."""
    numbers = [
        int(str(n.get("node_id"))[1:])
        for n in previous
        if re.fullmatch(r"n\d+", str(n.get("node_id")))
    ]
    return max(numbers, default=0) + 1
