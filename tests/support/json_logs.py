"""Logging as a service sets it up (JSON lines, debug level), written into a buffer, so a
test can read what a process would have logged: ``logs = JsonLogs()``, then
``logs.lines()`` / ``logs.events()``, and ``logs.restore()`` at the end."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from trellis.runtime.logs import setup_logging


class JsonLogs:
    def __init__(self, level: str = "debug") -> None:
        root = logging.getLogger()
        self._saved = root.handlers[:], root.level
        setup_logging(level, service="stack")
        self.buffer = io.StringIO()
        root.handlers[0].setStream(self.buffer)  # type: ignore[attr-defined]

    def lines(self) -> list[str]:
        return self.buffer.getvalue().splitlines()

    def events(self) -> list[dict[str, Any]]:
        """Every line, parsed (each must be one JSON object)."""
        return [json.loads(line) for line in self.lines()]

    def restore(self) -> None:
        root = logging.getLogger()
        root.handlers[:], level = self._saved
        root.setLevel(level)
