"""Lease upkeep: keep this replica's runs, take over runs whose owner died.

Every ``interval`` seconds (a third of the lease) one task renews the leases of the
runs executing here: a run whose lease could not be renewed has been taken over and
is dropped here, and a run that CancelRun flagged on another replica is cancelled.
It then claims RUNNING runs whose lease expired and hands them to the runner to
resume. Its first pass, at start-up, also claims the runs this replica owned before
a restart, without waiting for their leases to expire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection

from trellis.runtime.logs import get_logger
from trellis_executor.store import RunStore

log = get_logger(__name__)

#: Most runs claimed in one pass: a replica coming up after an outage takes some
#: and leaves the rest to its peers' next passes.
CLAIM_BATCH = 8


class LeaseKeeper:
    def __init__(
        self,
        store: RunStore,
        *,
        interval: float,
        held: Callable[[], Collection[str]],
        lost: Callable[[str], None],
        cancel: Callable[[str], Awaitable[object]],
        resume: Callable[[str], Awaitable[object]],
    ) -> None:
        self._store = store
        self._interval = interval
        self._held = held
        self._lost = lost
        self._cancel = cancel
        self._resume = resume
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Resume this replica's own unfinished runs, then keep leases in the background.

        Awaited before the server takes requests, so a run created here cannot be
        mistaken for one left over from before the restart.
        """
        await self.tick(own=True)
        self._task = asyncio.create_task(self._loop(), name="run-leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.tick()
            except Exception:
                # The store is unreachable: try again next pass. If this lasts past
                # the lease, peers take the runs over and our writes are refused.
                log.warning("lease upkeep failed", exc_info=True)

    async def tick(self, *, own: bool = False) -> list[str]:
        """One pass: renew, drop lost runs, cancel flagged ones, claim and resume;
        returns the claimed ids."""
        held = set(self._held())
        kept = await self._store.renew(held)
        for run_id in held - kept:
            self._lost(run_id)
        if kept:
            for run_id in await self._store.cancel_requested(kept):
                await self._cancel(run_id)
        claimed = await self._store.claim(limit=CLAIM_BATCH, own=own)
        for run_id in claimed:
            log.info("resuming run", run_id=run_id, owner=self._store.owner)
            await self._resume(run_id)
        return claimed
