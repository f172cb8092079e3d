"""Streamed tool calls, read call by call: each is a node the moment its arguments close.

The chat completions API streams tool calls as deltas keyed by ``index``: the first
delta of a call brings its ``id`` and function ``name``, later ones fragments of its
``arguments`` (a JSON object as text). A call is complete as soon as its arguments parse
as a whole JSON object (``jiter``; nothing valid can follow an object's closing brace),
so it starts before the model has written the next one; a call whose arguments never
close is complete when the next call begins or the stream ends, and is then rejected
(not JSON; or cut off, after ``finish_reason: length``). Servers that send a whole call
in one delta, or the name in every delta, read the same.

What the model may get wrong, and what becomes of it (the core's repair round takes
every rejected call): no function name, arguments that are not JSON or not an object;
an unknown function (the validator); the same call twice under one id (a provider
resending it): the copy is dropped; two different calls under one id: both run, since
node ids are Trellis's own (``NodeIds``) and the conversation uses those.

Text the model writes is part of the answer (narration beside tool calls, or the answer
itself) and is released as it comes, except text that starts like a tool call written
as text (``{``, ``[``, a code fence, ``<tool_call>``...: a server without a tool-call
parser for its model sends that): it is held, and at the end dropped if the reply also
called tools, rejected (``AS_TEXT``) if it did not, or, with ``release_text`` (a repair
round, or a reply that may not call tools), released after all: the model meant it as
its answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jiter

from trellis.runtime.logs import get_logger
from trellis_planner.candidates import CUT_OFF, Candidate, NodeIds
from trellis_planner.chunks import ChunkParts, ToolCallDelta
from trellis_planner.jsonl import LineTooLong, utf8_length
from trellis_planner.plan_schema import FunctionNames

log = get_logger(__name__)

AS_TEXT = "tool calls were written as text instead of being called as functions"
#: How text that is a tool call written out starts.
CALL_MARKERS = ("{", "[", "```", "<tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "<function")
_PREVIEW = 80


class TextGate:
    """Releases answer text as it streams, holding text that starts like a tool call."""

    def __init__(self) -> None:
        self._held = ""
        #: None while undecided; True: it looks like a call (held to the end).
        self._call_like: bool | None = None

    def feed(self, text: str) -> str:
        if self._call_like is False:
            return text
        self._held += text
        start = self._held.lstrip()
        if not start:
            return ""
        if any(start.startswith(m) for m in CALL_MARKERS):
            self._call_like = True
            return ""
        if any(m.startswith(start) for m in CALL_MARKERS):
            return ""  # could still become a marker
        self._call_like = False
        held, self._held = self._held, ""
        return held

    def close(self) -> tuple[str, bool]:
        """(text still held, whether it looks like a tool call)."""
        held, self._held = self._held, ""
        return held, bool(self._call_like)


@dataclass
class _Call:
    index: int
    id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    size: int = 0
    done: bool = False


class ToolCallReader:
    """Candidates of one reply's tool calls, and its answer text."""

    kind = "tool call"

    def __init__(
        self,
        ids: NodeIds,
        names: FunctionNames,
        *,
        release_text: bool = False,
        max_line_bytes: int | None = None,
    ) -> None:
        self._ids = ids
        self._names = names
        self._release_text = release_text
        self._limit = max_line_bytes
        self._calls: dict[int, _Call] = {}
        self._number = 0
        #: (id, function, arguments) of each call taken, to drop a resent copy.
        self._taken: set[tuple[str, str, str]] = set()
        self._gate = TextGate()
        #: Every candidate handed out, in order (the repair round echoes them).
        self.candidates: list[Candidate] = []
        #: Text held back as a tool call written out (rejected at the end).
        self.text_as_calls = ""

    @property
    def called(self) -> bool:
        return bool(self._calls)

    def feed(self, parts: ChunkParts) -> list[Candidate | str]:
        out: list[Candidate | str] = []
        if parts.text and (released := self._gate.feed(parts.text)):
            out.append(released)
        for delta in parts.tool_calls:
            out.extend(self._delta(delta))
        return out

    def _delta(self, delta: ToolCallDelta) -> list[Candidate]:
        out: list[Candidate] = []
        call = self._calls.get(delta.index)
        if call is None:  # a new call: the ones before it are as complete as they get
            out.extend(self._finish(c, cut_off=False) for c in self._open())
            call = self._calls[delta.index] = _Call(delta.index)
        if call.done:
            if delta.arguments:
                log.warning("tool call arguments after they closed: ignored", index=delta.index)
            return out
        call.id = call.id or delta.id
        call.name = call.name or delta.name
        if delta.arguments:
            call.pieces.append(delta.arguments)
            call.size += utf8_length(delta.arguments)
            if self._limit is not None and call.size > self._limit:
                out.append(self._too_long(call))
            elif "}" in delta.arguments and _closed("".join(call.pieces)):
                out.append(self._finish(call, cut_off=False))
        return [c for c in out if c is not None]

    def _open(self) -> list[_Call]:
        return [c for c in self._calls.values() if not c.done]

    def _too_long(self, call: _Call) -> Candidate:
        call.done = True
        self._number += 1
        start = "".join(call.pieces)[:_PREVIEW]
        error = LineTooLong(self._number, start, self._limit or 0)
        candidate = Candidate(
            self._number, None, start, error.problem, error, call.id, call.name, start
        )
        self.candidates.append(candidate)
        return candidate

    def _finish(self, call: _Call, *, cut_off: bool) -> Candidate | None:
        call.done = True
        arguments = "".join(call.pieces)
        if (call.id, call.name, arguments) in self._taken and call.id:
            log.warning("tool call sent twice under one id: the copy is dropped", id=call.id)
            return None
        self._taken.add((call.id, call.name, arguments))
        self._number += 1
        problem, args = _arguments(arguments)
        if cut_off and problem:
            problem = f"{problem}; {CUT_OFF}"
        if not call.name:
            problem = "the tool call has no function name" + (f"; {problem}" if problem else "")
        text = f"{call.name}({arguments})"
        value = None
        if not problem:
            node = self._ids.next()
            tool = self._names.tool(call.name)
            value = {"node_id": node, "tool": tool, "args": args, "depends_on": []}
        candidate = Candidate(
            self._number, value, text, problem, None, call.id, call.name, arguments
        )
        self.candidates.append(candidate)
        return candidate

    def close(self, cut_off: bool) -> list[Candidate | str]:
        out: list[Candidate | str] = []
        for call in self._open():
            if (candidate := self._finish(call, cut_off=cut_off)) is not None:
                out.append(candidate)
        held, call_like = self._gate.close()
        if not held:
            return out
        if not call_like or self._release_text:
            out.append(held)
        elif self.called:
            log.info("text beside the tool calls looked like a call: dropped")
        else:
            self.text_as_calls = held
            self._number += 1
            out.append(Candidate(self._number, None, held.strip(), AS_TEXT))
        return out


def _closed(arguments: str) -> bool:
    try:
        jiter.from_json(arguments.encode())
    except ValueError:
        return False
    return True


def _arguments(arguments: str) -> tuple[str, dict[str, Any]]:
    """(problem, args) of a call's arguments text ("" stands for no arguments)."""
    if not arguments.strip():
        return "", {}
    try:
        value = jiter.from_json(arguments.encode())
    except ValueError as error:
        return f"arguments are not valid JSON ({error})", {}
    if not isinstance(value, dict):
        return f"arguments must be a JSON object, got {type(value).__name__}", {}
    return "", value
