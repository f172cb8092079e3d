"""A server stream gRPC drops instead of cancelling (its caller left while a response was
being written) is closed by the event loop, in a task and a context of its own: the
servicer's cleanup still runs (the executor cancels a run nobody follows), and leaving
the request scope there is not an error."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import NamedTuple

from trellis.runtime import context
from trellis.runtime.interceptors import _wrap_stream


class Metadatum(NamedTuple):
    """One metadata entry as a servicer context gives it."""

    key: str
    value: str


class Ctx:
    """The parts of a servicer context the wrapper reads."""

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return (Metadatum("x-tenant-id", "acme"),)

    def time_remaining(self) -> float:
        return 30.0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def test_a_dropped_stream_still_runs_the_servicers_cleanup() -> None:
    cleaned: list[str] = []

    async def follow(request: object, ctx: object) -> AsyncIterator[int]:
        try:
            for i in range(1000):
                yield i
                await asyncio.sleep(0)
        finally:
            cleaned.append(context.tenant())

    handler = _wrap_stream("/p.S/Follow", follow, None, None)
    stream = handler(object(), Ctx())
    assert await anext(stream) == 0
    # what the event loop's async-generator finalizer does with an abandoned stream:
    # aclose() in a new task, in a copy of another context
    closing = asyncio.get_running_loop().create_task(
        stream.aclose(), context=contextvars.copy_context()
    )
    await asyncio.wait_for(closing, 5)  # no error leaving the scope in that context
    assert cleaned == ["acme"]  # ran at once, still in the request's scope
