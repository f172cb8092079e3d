"""Scripted replies for the offline model in tests: a FIFO of ``Behaviour``s, one per
chat request; an empty queue means "rules".

The rules answer everything a happy path needs; tests of the unhappy paths (a model
that writes an invalid plan, asks to replan, fails with 500 or 429, stalls, breaks its
stream with an event that is not JSON, streams tool calls a given way, refuses) push
behaviours here. ``fail_model`` makes every request for one model fail (a dead model,
for the breaker), whatever is queued. ``script_of(model)`` installs a script on a
running model (once) and returns it.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from trellis_offline_model.behaviour import BROKEN_EVENT, Behaviour
from trellis_offline_model.server import ModelState, RunningModel


class Script:
    """A FIFO of behaviours for one server."""

    def __init__(self) -> None:
        self._queue: deque[Behaviour] = deque()
        self._dead: dict[str, Behaviour] = {}
        #: The model each request asked for, in order.
        self.models: list[str] = []

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

    def plan(self, *nodes: Mapping[str, Any], times: int = 1) -> None:
        """The next ``times`` requests get ``nodes`` as the plan, in the request's format."""
        self.push(*[Behaviour(plan=tuple(dict(n) for n in nodes))] * times)

    def deltas(self, *deltas: Mapping[str, Any], finish_reason: str | None = None) -> None:
        """The next request streams exactly these deltas (one chunk each)."""
        self.push(Behaviour(deltas=tuple(dict(d) for d in deltas), finish_reason=finish_reason))

    def tool_calls(
        self,
        *calls: tuple[str, str],
        ids: Sequence[str] | None = None,
        split: int = 3,
        text: str = "",
        finish_reason: str | None = None,
    ) -> None:
        """The next request streams these (function, arguments text) calls as OpenAI
        does: per call a first delta with id and name, then the arguments in ``split``
        fragments; ``text`` first as content; ``ids`` (default call_1, call_2...)."""
        out: list[dict[str, Any]] = [{"content": text}] if text else []
        for index, (name, arguments) in enumerate(calls):
            call_id = ids[index] if ids is not None else f"call_{index + 1}"
            first = {"index": index, "id": call_id, "type": "function"}
            out.append({"tool_calls": [{**first, "function": {"name": name, "arguments": ""}}]})
            size = max(1, -(-len(arguments) // split))
            for start in range(0, len(arguments), size):
                piece = arguments[start : start + size]
                fragment = {"index": index, "function": {"arguments": piece}}
                out.append({"tool_calls": [fragment]})
        self.deltas(*out, finish_reason=finish_reason)

    def fail_model(self, model: str, status: int = 500, message: str = "model is down") -> None:
        """Every request for ``model`` fails with HTTP ``status`` (until ``revive``)."""
        self._dead[model] = Behaviour(status=status, message=message)

    def revive(self, model: str) -> None:
        self._dead.pop(model, None)

    def next(self, body: Mapping[str, Any] | None = None) -> Behaviour | None:
        model = str((body or {}).get("model", ""))
        self.models.append(model)
        if model in self._dead:
            return self._dead[model]
        return self._queue.popleft() if self._queue else None

    def clear(self) -> None:
        self._queue.clear()
        self._dead.clear()

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
