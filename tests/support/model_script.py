"""Scripted replies for the offline model in tests: a FIFO of ``Behaviour``s, one per
chat request; an empty queue means "rules".

The rules answer everything a happy path needs; tests of the unhappy paths (a model
that writes an invalid plan, asks to replan, fails with 500 or 429, stalls, or breaks
its stream with an event that is not JSON) push behaviours here. ``script_of(model)``
installs a script on a running model (once) and returns it.
"""

from __future__ import annotations

import weakref
from collections import deque

from trellis_offline_model.behaviour import BROKEN_EVENT, Behaviour
from trellis_offline_model.server import ModelState, RunningModel


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


_SCRIPTS: weakref.WeakKeyDictionary[ModelState, Script] = weakref.WeakKeyDictionary()


def script_of(model: RunningModel) -> Script:
    """The script of ``model``: its next requests take the behaviours queued here."""
    script = _SCRIPTS.get(model.state)
    if script is None:
        script = _SCRIPTS[model.state] = Script()
        model.state.next_behaviour = script.next
    return script
