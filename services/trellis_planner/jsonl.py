"""A streaming JSON Lines parser: each complete line is parsed the moment it ends.

The planner streams the plan to the executor node by node, so it cannot wait for the
whole model output. Models wrap output in Markdown fences and leave blank lines; both
are skipped. Anything else that is not JSON is an error naming its line, because the
repair round (and the person reading the log) needs to know exactly what was wrong.

By default a bad line raises ``JsonLinesError``. With ``strict=False`` it comes back as a
``JsonLine`` whose ``error`` is set, and parsing goes on with the next line, so the
planner can keep streaming the good lines and list every bad one in the repair round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class JsonLinesError(ValueError):
    """A line of the output that is not valid JSON."""

    def __init__(self, line_number: int, line: str, problem: str) -> None:
        preview = line if len(line) <= 80 else line[:77] + "..."
        super().__init__(f"line {line_number}: {problem}: {preview!r}")
        self.line_number = line_number
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class JsonLine:
    """One parsed line, its 1-based number in the whole output and its text (stripped).

    ``error`` is set (and ``value`` is None) for a line that is not JSON, in non-strict mode.
    """

    number: int
    value: Any
    text: str = ""
    error: JsonLinesError | None = None


class JsonLinesParser:
    """Feed text in chunks cut anywhere; get back the lines each chunk completed."""

    def __init__(self, *, strict: bool = True) -> None:
        self._strict = strict
        self._pending = ""
        self._line_number = 0

    def feed(self, text: str) -> list[JsonLine]:
        self._pending += text
        *complete, self._pending = self._pending.split("\n")
        return [parsed for line in complete if (parsed := self._parse(line)) is not None]

    def close(self) -> list[JsonLine]:
        """Parse the last line, which may lack its newline."""
        line, self._pending = self._pending, ""
        parsed = self._parse(line) if line else None
        return [parsed] if parsed is not None else []

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
