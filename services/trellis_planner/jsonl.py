"""A streaming JSON Lines parser: each complete line is parsed the moment it ends.

The planner streams the plan to the executor node by node, so it cannot wait for the
whole model output. Models wrap output in Markdown fences and leave blank lines; both
are skipped. Anything else that is not JSON is an error naming its line, because the
repair round (and the person reading the log) needs to know exactly what was wrong.

By default a bad line raises ``JsonLinesError``. With ``strict=False`` it comes back as a
``JsonLine`` whose ``error`` is set, and parsing goes on with the next line, so the
planner can keep streaming the good lines and list every bad one in the repair round.

The work is linear in the output, however it is cut into chunks: each chunk is searched
for a newline once (``examined`` counts those characters) and the pieces of an
unfinished line are only joined when it ends. The parser runs on the planner's event
loop, so re-scanning a long unfinished line for every chunk would stall every other run
of the process. With ``max_line_bytes`` a line is refused (``LineTooLong``) as soon as
it grows past the limit, before it ends; the rest of it is skipped, unparsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: Characters of a refused line kept for its error message.
_PREVIEW_CHARS = 80


class JsonLinesError(ValueError):
    """A line of the output that is not valid JSON."""

    def __init__(self, line_number: int, line: str, problem: str) -> None:
        preview = line if len(line) <= _PREVIEW_CHARS else line[: _PREVIEW_CHARS - 3] + "..."
        super().__init__(f"line {line_number}: {problem}: {preview!r}")
        self.line_number = line_number
        self.line = line
        self.problem = problem


class LineTooLong(JsonLinesError):
    """A line longer than the parser's ``max_line_bytes``; ``line`` holds its start only."""

    def __init__(self, line_number: int, start: str, limit: int) -> None:
        super().__init__(line_number, start, f"longer than {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class JsonLine:
    """One parsed line, its 1-based number in the whole output and its text (stripped).

    ``error`` is set (and ``value`` is None) for a line that is not JSON, in non-strict
    mode; for a ``LineTooLong`` line ``text`` is only the line's start.
    """

    number: int
    value: Any
    text: str = ""
    error: JsonLinesError | None = None


def utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class JsonLinesParser:
    """Feed text in chunks cut anywhere; get back the lines each chunk completed.

    ``max_line_bytes`` (UTF-8, without the newline; None: no limit) bounds one line.
    """

    def __init__(self, *, strict: bool = True, max_line_bytes: int | None = None) -> None:
        self._strict = strict
        self._limit = max_line_bytes
        #: The unfinished line, in the pieces it came in, and its size in bytes.
        self._pieces: list[str] = []
        self._pending_bytes = 0
        #: The unfinished line was refused: drop the rest of it, up to its newline.
        self._skipping = False
        self._line_number = 0
        #: Characters searched for a newline so far: each character of the input once.
        self.examined = 0

    def feed(self, text: str) -> list[JsonLine]:
        out: list[JsonLine] = []
        start = 0
        while True:
            end = text.find("\n", start)
            self.examined += (len(text) if end < 0 else end + 1) - start
            if end < 0:
                self._extend(text[start:], out)
                return out
            self._extend(text[start:end], out)
            if not self._skipping:
                line = "".join(self._pieces)
                if (parsed := self._parse(line)) is not None:
                    out.append(parsed)
            self._pieces, self._pending_bytes, self._skipping = [], 0, False
            start = end + 1

    def close(self) -> list[JsonLine]:
        """Parse the last line, which may lack its newline."""
        line = "" if self._skipping else "".join(self._pieces)
        self._pieces, self._pending_bytes, self._skipping = [], 0, False
        parsed = self._parse(line) if line else None
        return [parsed] if parsed is not None else []

    def _extend(self, piece: str, out: list[JsonLine]) -> None:
        """Add ``piece`` to the unfinished line; refuse the line once it is over the limit."""
        if self._skipping or not piece:
            return
        self._pieces.append(piece)
        if self._limit is None:
            return
        self._pending_bytes += utf8_length(piece)
        if self._pending_bytes > self._limit:
            out.append(self._refuse())

    def _refuse(self) -> JsonLine:
        """The unfinished line as a ``LineTooLong`` (raised when strict); skip the rest."""
        assert self._limit is not None
        self._line_number += 1
        head: list[str] = []
        size = 0
        for piece in self._pieces:  # the line's first bytes, the same however it was cut
            head.append(piece)
            size += len(piece)
            if size >= self._limit + _PREVIEW_CHARS:
                break
        start = "".join(head).encode("utf-8", "surrogatepass")[: self._limit]
        preview = start.decode("utf-8", "ignore").strip()[:_PREVIEW_CHARS]
        self._pieces, self._pending_bytes, self._skipping = [], 0, True
        error = LineTooLong(self._line_number, preview, self._limit)
        if self._strict:
            raise error
        return JsonLine(self._line_number, None, preview, error)

    def _parse(self, raw: str) -> JsonLine | None:
        self._line_number += 1
        line = raw.strip()
        if not line or line.startswith("```"):
            return None
        try:
            return JsonLine(self._line_number, json.loads(line), line)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg} at column {error.colno})"
        except ValueError as error:  # e.g. an integer over Python's 4300-digit limit
            problem = f"not valid JSON ({error})"
        except RecursionError:
            problem = "not valid JSON (nested too deeply)"
        bad = JsonLinesError(self._line_number, line, problem)
        if self._strict:
            raise bad
        return JsonLine(self._line_number, None, line, bad)
