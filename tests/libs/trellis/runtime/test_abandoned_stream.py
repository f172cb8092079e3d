"""A server stream whose caller is gone mid-send ends in the call's own task: the failed
send stops it, the servicer's stream is closed at once (its cleanup — the executor
cancelling a run nobody follows — runs in the request's scope), and nothing is logged
as an error or answered. gRPC drops an async-generator handler in that case instead, to
be closed later by the event loop in another task and context (seen with a client killed
mid-stream), which is why the rules interceptor sends with ``context.write``."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import NamedTuple

from trellis.runtime import context
from trellis.runtime.interceptors import _wrap_stream


class Metadatum(NamedTuple):
    """One metadata entry as a servicer context gives it."""

    key: str
    value: str


class BrokenStream(Exception):
    """What gRPC's send raises once the stream broke (ExecuteBatchError)."""


class Ctx:
    """A servicer context whose stream breaks after ``sent_ok`` messages."""

    def __init__(self, sent_ok: int) -> None:
        self.sent: list[object] = []
        self.sent_ok = sent_ok
        self.aborted = False

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return (Metadatum("x-tenant-id", "acme"),)

    def time_remaining(self) -> float:
        return 30.0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def write(self, message: object) -> None:
        if len(self.sent) == self.sent_ok:
            raise BrokenStream("execute_batch failed")
        self.sent.append(message)

    async def abort(self, *args: object, **kwargs: object) -> None:
        self.aborted = True


async def test_a_broken_stream_closes_the_servicers_stream_in_the_calls_task(caplog) -> None:
    cleaned: list[tuple[str, asyncio.Task | None]] = []

    async def follow(request: object, ctx: object) -> AsyncIterator[int]:
        try:
            for i in range(1000):
                yield i
                await asyncio.sleep(0)
        finally:
            cleaned.append((context.tenant(), asyncio.current_task()))

    handler = _wrap_stream("/p.S/Follow", follow, None, None)
    assert inspect.iscoroutinefunction(handler)  # gRPC awaits it; it never drops it
    ctx = Ctx(sent_ok=3)
    with caplog.at_level(logging.INFO):
        call = asyncio.create_task(handler(object(), ctx))
        await asyncio.wait_for(call, 5)
    assert ctx.sent == [0, 1, 2]
    assert cleaned == [("acme", call)]  # at once, in the call's task, in its scope
    assert not ctx.aborted  # nobody is left to answer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "stream ended: the caller is gone (BrokenStream)" in caplog.text
