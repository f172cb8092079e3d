"""Coalescing: items submitted while one group is being sent go together in the next.

Two writes in Trellis are sent in groups: the run store's state writes (one PostgreSQL
transaction — one synchronous disk flush — for the writes of one scheduler step) and the
usage outboxes' events (one ``RecordUsages`` for many tool or model calls). Both follow
"flush when idle": the first item goes at once (after ``window`` seconds, if set, to let
company arrive), and every item submitted while its group is sent goes in the next group,
at most ``max_group`` to a group. Each submitter gets a future that ends with its own
item's outcome (a result, or the error that item — or its whole group — failed with), and
items keep the order they were submitted in.

An item whose future is already done when its group is formed (its submitter was
cancelled) is still sent unless ``drop_abandoned``: the run store commits a write it was
asked for; the outbox has kept an abandoned event on disk instead, so it skips it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Sends ``items`` (in order) as one group and returns, per item, its result or the
#: error it failed with; raising fails every item of the group with that error.
SendMany = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]


class Coalescer(Generic[T, R]):
    """Queues items and sends them in groups; see the module docstring."""

    def __init__(
        self,
        send_many: SendMany[T, R],
        *,
        max_group: int,
        window: float = 0.0,
        drop_abandoned: bool = False,
        name: str = "coalescer",
    ) -> None:
        self._send_many = send_many
        self._max_group = max_group
        self._window = window
        self._drop_abandoned = drop_abandoned
        self._name = name
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._drain: asyncio.Task[None] | None = None
        #: Groups sent (for tests and metrics: fewer than items when they coalesced).
        self.groups = 0

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` now (not when a task first runs: a stop right after still
        sends it); the future ends with its outcome."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drain is None:
            self._drain = asyncio.create_task(self._run(), name=self._name)
        return future

    async def send(self, item: T) -> R:
        """Send ``item`` with whatever else is queued; its result, or raise its error."""
        return await self.submit(item)

    async def _run(self) -> None:
        try:
            while self._queue:
                if self._window > 0:
                    await asyncio.sleep(self._window)
                group = self._queue[: self._max_group]
                del self._queue[: self._max_group]
                if self._drop_abandoned:
                    group = [(item, future) for item, future in group if not future.done()]
                    if not group:
                        continue
                try:
                    outcomes = await self._send_many([item for item, _ in group])
                except Exception as error:
                    outcomes = [error] * len(group)
                self.groups += 1
                for (_item, future), outcome in zip(group, outcomes, strict=True):
                    if future.done():  # its submitter was cancelled: nobody to tell
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._drain = None
            for _item, future in self._queue:  # only when cancelled: nobody will send them
                if not future.done():
                    future.cancel()
            self._queue.clear()

    async def aclose(self) -> None:
        """Wait for the items queued so far to be sent."""
        if self._drain is not None:
            await asyncio.gather(self._drain, return_exceptions=True)

    async def cancel(self) -> None:
        """Stop sending: the group in flight is abandoned, queued items' futures cancelled."""
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
