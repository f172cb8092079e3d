"""Canned behaviours a test queues on one server, consumed one per chat request.

The rules answer everything a happy path needs; tests of the unhappy paths (a model
that writes an invalid plan, asks to replan, fails with 500 or 429, stalls, or breaks
its stream with an event that is not JSON) push behaviours here. Each request takes
the next behaviour; an empty queue means "rules".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

#: The ``data:`` of a broken stream event: a chunk cut off mid-JSON, as a proxy that
#: truncates a stream or a provider bug sends it.
BROKEN_EVENT = '{"id": "chatcmpl-broken", "object": "chat.completion.chunk", "choices": [{"del'


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
    #: Stream this many pieces of the output, then the event ``broken_event`` (not
    #: JSON), then end the response; None streams the whole output.
    break_after_pieces: int | None = None
    broken_event: str = BROKEN_EVENT


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

    def break_stream(
        self, text: str | None = None, *, after_pieces: int = 1, event: str = BROKEN_EVENT
    ) -> None:
        """The next request streams ``after_pieces`` pieces of ``text`` (None: the rules'
        output), then a ``data:`` line that is ``event`` instead of a JSON chunk."""
        self.push(Behaviour(text=text, break_after_pieces=after_pieces, broken_event=event))

    def next(self) -> Behaviour | None:
        return self._queue.popleft() if self._queue else None

    def clear(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)
