"""Single-flight: identical concurrent calls share one execution.

When a hundred agents ask the same question at the same moment, the cache is empty
for all of them; without this, the backend runs a hundred times and the cache is
written a hundred times. Here the first caller starts the work and everyone who
arrives with the same key while it runs awaits that same result.

The work runs in its own task, so the leader's caller going away does not fail the
followers; the task is cancelled only when every caller waiting for it is gone.

``then`` is follow-up work on the result (the invoker's cache write) that callers
need not wait for: they are answered as soon as the result exists. The key's next
flight starts only once ``then`` is done, so it sees the follow-up's effect: a call
arriving while the cache entry is still being written waits for the write and then
finds the entry, instead of missing it and running the tool again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Flight(Generic[T]):
    result: asyncio.Future[T]
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    waiters: int = 0


class SingleFlight(Generic[T]):
    """Runs at most one ``fn`` per key at a time; concurrent callers share its result."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def drain(self) -> None:
        """Wait for the flights under way now, their ``then`` included (errors are the
        callers')."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def do(
        self,
        key: Hashable,
        fn: Callable[[], Awaitable[T]],
        *,
        then: Callable[[T], Awaitable[None]] | None = None,
    ) -> tuple[T, bool]:
        """``fn()``'s result (or exception) and whether it was shared (another caller's run).

        The leader's ``fn`` runs in a task that copies the leader's context (tenant,
        deadline, current span), so followers get what the leader would. ``then``
        must not raise (its exceptions are dropped).
        """
        flight = self._flights.get(key)
        while flight is not None and flight.result.done() and flight.task is not None:
            await asyncio.shield(flight.task)  # the last flight's ``then`` still runs
            flight = self._flights.get(key)
        shared = flight is not None
        if flight is None:
            flight = _Flight(asyncio.get_running_loop().create_future())
            self._flights[key] = flight
            flight.task = asyncio.ensure_future(self._fly(key, flight, fn, then))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.result), shared
        except asyncio.CancelledError:
            if not flight.result.done():
                flight.waiters -= 1
                if flight.waiters == 0 and flight.task is not None:
                    flight.task.cancel()  # nobody wants the result any more
            raise

    async def _fly(
        self,
        key: Hashable,
        flight: _Flight[T],
        fn: Callable[[], Awaitable[T]],
        then: Callable[[T], Awaitable[None]] | None,
    ) -> None:
        try:
            try:
                value = await fn()
            except asyncio.CancelledError:
                flight.result.cancel()
                raise
            except Exception as error:
                flight.result.set_exception(error)
                return
            flight.result.set_result(value)
            if then is not None:
                # Yield once, so the callers are woken before the follow-up's own work.
                await asyncio.sleep(0)
                with contextlib.suppress(Exception):  # documented: ``then`` handles its errors
                    await then(value)
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
