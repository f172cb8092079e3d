"""Coalescing: items submitted while one group is being sent go together in the next.

Two writes in Trellis are sent in groups: the run store's state writes (one PostgreSQL
transaction — one synchronous disk flush — for the writes of one scheduler step) and the
usage outboxes' events (one ``RecordUsages`` for many tool or model calls). Both follow
"flush when idle": the first item goes at once (after ``window`` seconds, if set, to let
company arrive), and every item submitted while its group is sent goes in the next group,
at most ``max_group`` to a group. Each submitter gets a future that ends with its own
item's outcome (a result, or the error that item — or its whole group — failed with), and
items keep the order they were submitted in.

An item may be submitted ``within`` a longer wait than ``window`` (the usage of a call that
cost nothing, which no budget waits for): it goes with the next group that forms for
another reason, or when its own wait is over, so idle-time traffic becomes rare. A
``flush`` sends everything queued at once.

An item whose future is already done when its group is formed (its submitter was
cancelled) is still sent unless ``drop_abandoned``: the run store commits a write it was
asked for; the outbox has kept an abandoned event on disk instead, so it skips it.
"""

from __future__ import annotations

import asyncio
import time
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
        #: When the queue's most pressing item must go (monotonic), and its wake-up.
        self._due = float("inf")
        self._sooner = asyncio.Event()
        self._drain: asyncio.Task[None] | None = None
        #: Groups sent (for tests and metrics: fewer than items when they coalesced).
        self.groups = 0

    def submit(self, item: T, *, within: float | None = None) -> asyncio.Future[R]:
        """Queue ``item`` now (not when a task first runs: a stop right after still
        sends it), to go within ``window`` seconds or, if given and longer, ``within``;
        the future ends with its outcome."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        due = time.monotonic() + max(self._window, within or 0.0)
        if due < self._due:
            self._due = due
            self._sooner.set()
        if self._drain is None:
            self._drain = asyncio.create_task(self._run(), name=self._name)
        return future

    async def send(self, item: T) -> R:
        """Send ``item`` with whatever else is queued; its result, or raise its error."""
        return await self.submit(item)

    async def _run(self) -> None:
        try:
            while self._queue:
                await self._until_due()
                group = self._queue[: self._max_group]
                del self._queue[: self._max_group]
                # what is left (or comes now) goes in the next group, without a wait
                self._due = float("inf") if not self._queue else time.monotonic()
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
            self._due = float("inf")
            for _item, future in self._queue:  # only when cancelled: nobody will send them
                if not future.done():
                    future.cancel()
            self._queue.clear()

    async def _until_due(self) -> None:
        """Wait until the queue's most pressing item is due (sooner if one comes)."""
        while (left := self._due - time.monotonic()) > 0:
            self._sooner.clear()
            try:
                async with asyncio.timeout(left):
                    await self._sooner.wait()
            except TimeoutError:
                return

    def flush(self) -> None:
        """Send what is queued now, whatever it was submitted ``within``."""
        if self._queue:
            self._due = time.monotonic()
            self._sooner.set()

    async def aclose(self) -> None:
        """Send the items queued so far at once, and wait for them to be sent."""
        self.flush()
        if self._drain is not None:
            await asyncio.gather(self._drain, return_exceptions=True)

    async def cancel(self) -> None:
        """Stop sending: the group in flight is abandoned, queued items' futures cancelled."""
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
