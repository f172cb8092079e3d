"""The ``json_schema`` plan, ``{"nodes": [...]}``, read node by node while it streams.

Parsing is ``jiter``'s (installed with ``openai``): its partial mode reads the document
so far, whatever is still open, so each node can be taken the moment its object closes,
not when the whole plan has arrived. Whether the last node read is closed is one more
strict parse of the document with its open array and object closed after it (a node
still open, e.g. ``{"args": {"a": 1}`` makes that parse fail). Both run only for chunks
that contain a ``}``, the only character that can close a node, and only over the text
after the last chunk that ended on a closed node (as ``{"nodes": [<that text>``), so
reading stays linear in the plan's length.

Anything before the document's first ``{`` (a Markdown fence, prose from a server that
ignored the response format) is skipped, and so is a fence after it. A document that is
not JSON, or not ``{"nodes": [...]}``, is one rejected candidate at the end (the repair
round gets it); a node still open when a ``finish_reason: length`` ended the stream is
rejected as cut off. ``max_line_bytes`` bounds one node: more text than that since the
last node closed ends the plan (``LineTooLong``), as a JSONL line that long would.
"""

from __future__ import annotations

import json
from typing import Any

import jiter

from trellis_planner.candidates import CUT_OFF, Candidate
from trellis_planner.chunks import ChunkParts
from trellis_planner.jsonl import LineTooLong, utf8_length

_PREVIEW = 80
_CLOSERS = ("", "}", "]}")


def _parse(text: str, partial: bool) -> Any:
    return jiter.from_json(text.encode(), partial_mode="on" if partial else "off")


def _valid(text: str) -> bool:
    try:
        _parse(text, partial=False)
    except ValueError:
        return False
    return True


def _closed(doc: str) -> bool:
    """Whether the last node read from ``doc`` (a document cut anywhere) is complete."""
    end = doc.rstrip()
    if end.endswith(","):
        return _valid(end[:-1] + "]}")
    return any(_valid(end + closer) for closer in _CLOSERS)


def _nodes(value: Any) -> list[Any] | None:
    if isinstance(value, dict) and isinstance(value.get("nodes"), list):
        return value["nodes"]
    return None


def _text(node: Any) -> str:
    return json.dumps(node, ensure_ascii=False)


class JsonPlanReader:
    """Candidates of a ``{"nodes": [...]}`` document, each as soon as it closes."""

    kind = "node"

    def __init__(self, max_line_bytes: int | None) -> None:
        self._limit = max_line_bytes
        self._text = ""
        self._start: int | None = None  # where the document begins in ``_text``
        self._taken = 0  # nodes already handed out
        self._taken_at = 0  # len(_text) when the last one was
        #: Where in the document the text not yet read starts (0: the whole of it is
        #: read again), and how many nodes were taken before it.
        self._cut = 0
        self._cut_taken = 0
        self._broken = False  # not JSON: nothing more until the end
        self._refused = False  # a node over the limit ended the plan
        #: UTF-8 bytes since the last node was taken (what ``max_line_bytes`` bounds).
        self._pending_bytes = 0

    @property
    def _doc(self) -> str:
        return "" if self._start is None else self._text[self._start :]

    def feed(self, parts: ChunkParts) -> list[Candidate | str]:
        if not parts.text:
            return []
        self._text += parts.text
        if self._start is None:
            brace = self._text.find("{")
            if brace < 0:
                return []
            self._start = brace
        if self._broken:
            return []
        out: list[Candidate | str] = []
        text = parts.text
        self._pending_bytes += utf8_length(text)
        if "}" in text:
            out.extend(self._complete())  # a node taken: its bytes no longer count
        if self._limit is not None and not self._broken and self._pending_bytes > self._limit:
            out.append(self._too_long(self._text[self._taken_at :]))
        return out

    def _complete(self) -> list[Candidate]:
        doc = self._doc
        rest = doc if not self._cut else '{"nodes": [' + doc[self._cut :].lstrip().lstrip(",")
        try:
            nodes = _nodes(_parse(rest, partial=True))
        except ValueError:
            self._broken = True
            return []
        if nodes is None:
            return []
        closed = bool(nodes) and _closed(rest)
        done = len(nodes) if closed else max(0, len(nodes) - 1)
        out = self._take(nodes, done, self._cut_taken)
        if closed:  # everything so far is read: start after it next time
            self._cut, self._cut_taken = len(doc), self._taken
        return out

    def _take(self, nodes: list[Any], upto: int, offset: int = 0) -> list[Candidate]:
        """Hand out ``nodes[..upto]`` not handed out yet (``nodes[0]`` is node ``offset``)."""
        out = []
        while self._taken < upto + offset:
            node = nodes[self._taken - offset]
            self._taken += 1
            out.append(Candidate(self._taken, node, _text(node)))
            self._taken_at = len(self._text)
            self._pending_bytes = 0
        return out

    def _too_long(self, pending: str) -> Candidate:
        self._broken = self._refused = True
        error = LineTooLong(self._taken + 1, pending.strip()[:_PREVIEW], self._limit or 0)
        return Candidate(self._taken + 1, None, error.line, error.problem, too_long=error)

    def close(self, cut_off: bool) -> list[Candidate | str]:
        if self._refused:
            return []
        doc = self._doc.rstrip()
        if doc.endswith("```"):
            doc = doc[:-3].rstrip()
        if not doc:
            if self._text.strip():
                return [self._unreadable('not a JSON object {"nodes": [...]}', self._text)]
            return []  # no output at all: an empty plan
        try:
            nodes = _nodes(_parse(doc, partial=False))
        except ValueError as error:
            if not cut_off:
                return [self._unreadable(f"not valid JSON ({error})", doc)]
            try:
                nodes = _nodes(_parse(doc, partial=True))
            except ValueError:
                return [self._unreadable(f"not valid JSON ({error}); {CUT_OFF}", doc)]
            if nodes is None:
                return [self._unreadable(CUT_OFF, doc)]
            out: list[Candidate | str] = list(self._take(nodes, max(0, len(nodes) - 1)))
            if len(nodes) > self._taken:
                out.append(Candidate(self._taken + 1, None, _text(nodes[-1]), CUT_OFF))
            return out
        if nodes is None:
            return [self._unreadable('must be a JSON object {"nodes": [...]}', doc)]
        return list(self._take(nodes, len(nodes)))

    def _unreadable(self, problem: str, text: str) -> Candidate:
        return Candidate(self._taken + 1, None, text.strip(), problem)
