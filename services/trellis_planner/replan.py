"""Telling an answer from a request to replan while the join output streams.

A join answer streams to the user token by token, but an output starting with
``REPLAN:`` is not an answer and must not leak as one. So, when replanning is allowed,
the first few characters are held back until they either spell ``REPLAN:`` (then the
whole output is withheld and its first line is the reason) or cannot (then everything
flows through). When replanning is not allowed nothing is held back: it is all answer.
"""

from __future__ import annotations

from trellis_planner.prompts import REPLAN_PREFIX


class ReplanGate:
    def __init__(self, allow_replan: bool) -> None:
        self._held = ""
        self._text = ""
        #: None while undecided; then True (replan) or False (answer).
        self._replan: bool | None = None if allow_replan else False

    @property
    def replan(self) -> bool:
        return bool(self._replan)

    @property
    def reason(self) -> str:
        """The rest of the REPLAN line (or, if empty, the next non-empty line)."""
        if not self.replan:
            return ""
        rest = self._text.lstrip()[len(REPLAN_PREFIX) :]
        lines = [line.strip() for line in rest.splitlines() if line.strip()]
        return lines[0] if lines else ""

    def feed(self, text: str) -> list[str]:
        """The answer text that may be released now."""
        self._text += text
        if self._replan is False:
            return [text]
        if self._replan:
            return []
        self._held += text
        start = self._held.lstrip()
        if start.startswith(REPLAN_PREFIX):
            self._replan = True
            return []
        if REPLAN_PREFIX.startswith(start):
            return []  # still a prefix of REPLAN: (or only whitespace so far)
        self._replan = False
        held, self._held = self._held, ""
        return [held]

    def close(self) -> list[str]:
        """At the end of the output: release what was held back if it was no REPLAN."""
        if self._replan is None:
            self._replan = False
            held, self._held = self._held, ""
            return [held] if held else []
        return []
