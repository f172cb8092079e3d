"""Canned behaviours a test queues on one server, consumed one per chat request.

The rules answer everything a happy path needs; tests of the unhappy paths (a model
that writes an invalid plan, asks to replan, fails with 500 or 429, or stalls) push
behaviours here. Each request takes the next behaviour; an empty queue means "rules".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Behaviour:
    """What to do instead of the rules for one request."""

    #: Emit this text instead of the rules' output (streamed like any output).
    text: str | None = None
    #: Answer with this HTTP error status (OpenAI-shaped error body) instead.
    status: int | None = None
    message: str = "scripted failure"
    #: ``retry-after-ms`` header on an error, so client retries are quick in tests.
    retry_after_ms: int | None = None
    #: Wait this long before answering (to trigger client timeouts).
    stall_seconds: float = 0.0


class Script:
    """A FIFO of behaviours for one server."""

    def __init__(self) -> None:
        self._queue: deque[Behaviour] = deque()

    def push(self, *behaviours: Behaviour) -> None:
        self._queue.extend(behaviours)

    def reply(self, text: str, *, times: int = 1) -> None:
        """The next ``times`` requests get ``text`` as the model's output."""
        self.push(*[Behaviour(text=text)] * times)

    def fail(
        self,
        status: int,
        *,
        times: int = 1,
        message: str = "scripted failure",
        retry_after_ms: int | None = None,
    ) -> None:
        """The next ``times`` requests fail with HTTP ``status`` (a client retries count)."""
        self.push(
            *[Behaviour(status=status, message=message, retry_after_ms=retry_after_ms)] * times
        )

    def stall(self, seconds: float, *, times: int = 1) -> None:
        """The next ``times`` requests wait ``seconds`` before the rules answer."""
        self.push(*[Behaviour(stall_seconds=seconds)] * times)

    def next(self) -> Behaviour | None:
        return self._queue.popleft() if self._queue else None

    def clear(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)
