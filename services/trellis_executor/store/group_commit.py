"""Group commit: the writes queued while one commit runs share the next commit.

A run's events are stored before any client sees them, so each write's caller waits
for its commit; on PostgreSQL each commit is a synchronous disk flush. The writes of
one scheduler step (several nodes finishing at once, the next ones being planned)
come from concurrent tasks: instead of one transaction each, the first write goes at
once, and every write submitted while its commit runs goes in the next transaction,
together ("flush when idle": no timer, no write waits for company). Each caller
still returns only once its own write is committed, with its own error if it failed;
writes keep the order they were submitted in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

W = TypeVar("W")

#: Commits ``writes`` (in order) and returns, per write, None or the error it failed
#: with; raising fails every write of the batch with that error.
CommitMany = Callable[[Sequence[W]], Awaitable[Sequence[BaseException | None]]]

#: Most writes one transaction carries.
MAX_GROUP = 256


class GroupCommit(Generic[W]):
    """Queues writes and commits them in groups; ``write`` returns once committed."""

    def __init__(self, commit_many: CommitMany[W], *, max_group: int = MAX_GROUP) -> None:
        self._commit_many = commit_many
        self._max_group = max_group
        self._queue: list[tuple[W, asyncio.Future[None]]] = []
        self._drain: asyncio.Task[None] | None = None
        #: Transactions committed (for tests and metrics: fewer than writes when grouped).
        self.commits = 0

    async def write(self, item: W) -> None:
        """Commit ``item`` (with whatever else is queued); raise its error, if any.
        A cancelled caller's write is still committed: it was asked for."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drain is None:
            self._drain = asyncio.create_task(self._run(), name="store-group-commit")
        await future

    async def _run(self) -> None:
        try:
            while self._queue:
                group = self._queue[: self._max_group]
                del self._queue[: self._max_group]
                try:
                    errors = await self._commit_many([item for item, _ in group])
                except Exception as error:
                    errors = [error] * len(group)
                self.commits += 1
                for (_item, future), error in zip(group, errors, strict=True):
                    if future.done():  # its caller was cancelled: nobody to tell
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
        finally:
            self._drain = None

    async def aclose(self) -> None:
        """Wait for the writes queued so far to be committed."""
        if self._drain is not None:
            await asyncio.gather(self._drain, return_exceptions=True)
