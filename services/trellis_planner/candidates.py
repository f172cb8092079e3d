"""Plan candidates: what a model's stream yields, node by node, whatever the plan format.

Each format has a reader that turns the stream's chunks into ``Candidate``s the moment
one is complete — a JSONL line at its newline (``JsonlReader``), a node object at its
closing brace (``json_plan.JsonPlanReader``), a tool call once its arguments close
(``tool_stream.ToolCallReader``) — and, for tool calls, text that is part of the answer.
The core validates every candidate the same way (``validation.PlanValidator``), so
repair works alike in every format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from trellis_planner.chunks import ChunkParts
from trellis_planner.jsonl import JsonLine, JsonLinesParser, LineTooLong

#: Added to a problem when the output ended because of the model's token limit.
CUT_OFF = "cut off: the output reached the model's token limit (finish_reason: length)"
_NUMBERED = re.compile(r"^n(\d+)$")


@dataclass(frozen=True)
class Candidate:
    """One node as the model wrote it, or why it could not be read.

    ``number`` is its position in the output (line, node or tool call, from 1); ``value``
    the node as a mapping (``node_id``, ``tool``, ``args``, ``depends_on``), None when it
    is unreadable (``problem`` says why); ``text`` what the model wrote, for the repair.
    """

    number: int
    value: Any
    text: str
    problem: str = ""
    too_long: LineTooLong | None = None
    #: tool_calls: the call as the model wrote it (its id, function name, arguments).
    call_id: str = ""
    function: str = ""
    arguments: str = ""


class PlanReader(Protocol):
    #: How a candidate is named to the model ("line", "node", "tool call").
    kind: str

    def feed(self, parts: ChunkParts) -> list[Candidate | str]:
        """Candidates this chunk completed, and answer text (str) it releases."""
        ...

    def close(self, cut_off: bool) -> list[Candidate | str]:
        """The rest, once the stream ended (``cut_off``: by the token limit)."""
        ...


class NodeIds:
    """``n1``, ``n2``, ... for nodes the model does not name (tool calls), after every id
    already used in the run."""

    def __init__(self, used: Iterable[str] = ()) -> None:
        self._used = set(used)
        numbers = [int(m.group(1)) for u in self._used if (m := _NUMBERED.match(u))]
        self._next = max(numbers, default=0) + 1

    def next(self) -> str:
        while f"n{self._next}" in self._used:
            self._next += 1
        node_id = f"n{self._next}"
        self._used.add(node_id)
        return node_id


def _candidate(line: JsonLine, cut_off: bool = False) -> Candidate:
    if isinstance(line.error, LineTooLong):
        return Candidate(line.number, None, line.text, line.error.problem, too_long=line.error)
    if line.error is not None:
        problem = line.error.problem + (f"; {CUT_OFF}" if cut_off else "")
        return Candidate(line.number, None, line.text, problem)
    return Candidate(line.number, line.value, line.text)


class JsonlReader:
    """JSON Lines: a candidate per line, the moment its newline arrives."""

    kind = "line"

    def __init__(self, max_line_bytes: int | None) -> None:
        self._parser = JsonLinesParser(strict=False, max_line_bytes=max_line_bytes)

    def feed(self, parts: ChunkParts) -> list[Candidate | str]:
        return [_candidate(line) for line in self._parser.feed(parts.text)] if parts.text else []

    def close(self, cut_off: bool) -> list[Candidate | str]:
        return [_candidate(line, cut_off) for line in self._parser.close()]
