"""Per-tool concurrency limit with a bounded FIFO queue.

A tool declares ``max_concurrency`` to protect its backend (a rate-limited API, a
database with few connections). Calls beyond it wait in line, first come first
served; the line itself is bounded so a flood turns into fast ``RESOURCE_EXHAUSTED``
(reason ``TOOL_BUSY``) the caller can back off on, instead of an ever-growing pile of
waiting requests that all time out together.
"""

from __future__ import annotations

import asyncio
from collections import deque

from trellis.runtime.errors import ResourceExhausted
from trellis_toolgateway.tools.base import Spec


class ConcurrencyLimiter:
    """At most ``limit`` holders at once; at most ``queue_size`` more waiting.

    A released slot is handed straight to the oldest waiter, so a newcomer can never
    overtake the queue.
    """

    def __init__(self, limit: int, queue_size: int, *, name: str = "") -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if queue_size < 0:
            raise ValueError("queue_size must not be negative")
        self.limit = limit
        self.queue_size = queue_size
        self.name = name
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in line if needed; ``ResourceExhausted`` when the line is full.

        Cancel the wait (e.g. with ``asyncio.timeout``) to give up; the place in line,
        or a slot handed over at that very moment, is passed on.
        """
        if self._running < self.limit and not self._waiters:
            self._running += 1
            return
        if len(self._waiters) >= self.queue_size:
            raise ResourceExhausted(
                f"tool {self.name!r} is busy: {self._running} calls running and "
                f"{len(self._waiters)} waiting (max_concurrency {self.limit})",
                reason="TOOL_BUSY",
                metadata={"tool": self.name},
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # we were handed a slot as we gave up: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give the slot to the oldest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves on; ``_running`` is unchanged
                return
        self._running -= 1


class Limiters:
    """One limiter per tool, built from its spec; unbounded tools get none.

    When a reload changes a tool's ``max_concurrency`` a fresh limiter replaces the
    old one; calls still holding the old one release into it, so for one moment the
    old and the new limit may both be in use. That is the price of not blocking a
    reload on in-flight calls.
    """

    def __init__(self, *, queue_per_slot: int = 4) -> None:
        if queue_per_slot < 0:
            raise ValueError("queue_per_slot must not be negative")
        self._queue_per_slot = queue_per_slot
        self._limiters: dict[str, ConcurrencyLimiter] = {}

    def get(self, spec: Spec) -> ConcurrencyLimiter | None:
        if spec.max_concurrency <= 0:
            self._limiters.pop(spec.name, None)
            return None
        limiter = self._limiters.get(spec.name)
        if limiter is None or limiter.limit != spec.max_concurrency:
            limiter = ConcurrencyLimiter(
                spec.max_concurrency,
                self._queue_per_slot * spec.max_concurrency,
                name=spec.name,
            )
            self._limiters[spec.name] = limiter
        return limiter
