"""Run-once for side-effecting tools, keyed by the caller's idempotency key.

Sending an e-mail or creating a ticket must not happen twice because the executor
retried a call or resumed a run. The first call with a key *claims* it, runs, and
stores its outcome; any later call with the same key - even one arriving while the
first still runs - gets that first outcome back instead of running the tool again.

The store speaks bytes (a serialized outcome) behind a small Protocol, so a store
shared by all gateway replicas (Redis: ``trellis_toolgateway.redis_idempotency``) can
replace the in-memory one. A key reused with different arguments is a client bug,
reported as a ``KeyConflict`` rather than silently answered with another call's result.

At most once, not at least once: when the owner of a key stops without an outcome
although the tool may have run (its process died, its lease ran out, it was cancelled
mid-call), the key is *abandoned*: every later call with it gets ``OutcomeUnknown``
instead of running the tool again. The side effect happened once or not at all; a
human or the caller's own reconciliation decides which. A store that cannot be
reached raises ``StoreUnavailable``: nothing can be promised then, so nothing runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from trellis_toolgateway.policy.clock import Clock

DEFAULT_TTL = 24 * 3600.0


class KeyConflict(Exception):
    """The key was first used for a call with different arguments."""


class OutcomeUnknown(Exception):
    """The key's owner stopped without an outcome, and the tool may have run: running
    it again could repeat the side effect, so the call must not run."""


class StoreUnavailable(Exception):
    """The store cannot be reached: run-once cannot be promised, so the call must not run."""


class IdempotencyStore(Protocol):
    """Where first outcomes live. Keys arrive already scoped (tenant, tool, key)."""

    async def claim(self, key: str, fingerprint: str, ttl: float) -> bool:
        """True: the caller owns ``key`` and must ``complete`` or ``release`` it.
        False: another call has it (done or still running); ``wait`` for its outcome.
        Raises ``KeyConflict`` when the key is held for other arguments."""
        ...

    async def wait(self, key: str) -> bytes | None:
        """The first outcome once there is one; None if the owner released the key
        (or it expired): the caller may then try to claim it. Raises ``OutcomeUnknown``
        when the key was abandoned (or its owner's lease expired without an outcome)."""
        ...

    async def complete(self, key: str, outcome: bytes) -> None:
        """Store the owner's outcome; it is served for the key's TTL from now."""
        ...

    async def release(self, key: str) -> None:
        """The owner produced no outcome (nothing ran): forget the key."""
        ...

    async def abandon(self, key: str) -> None:
        """The owner stops without an outcome although the tool may have run: the key
        stays taken for its TTL and its waiters, now and later, get ``OutcomeUnknown``."""
        ...


@dataclass
class _Record:
    fingerprint: str
    ttl: float
    expires_at: float
    outcome: asyncio.Future[bytes | None] = field(repr=False)
    abandoned: bool = False


class MemoryIdempotencyStore:
    """In-process ``IdempotencyStore``: TTL per key, at most ``max_entries`` keys.

    Beyond the bound the oldest finished keys go first; running ones are kept, since
    forgetting them would let a duplicate run right now.
    """

    def __init__(self, *, max_entries: int = 10_000, clock: Clock = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    async def claim(self, key: str, fingerprint: str, ttl: float) -> bool:
        record = self._live(key)
        if record is not None:
            if record.fingerprint != fingerprint:
                raise KeyConflict(key)
            return False
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._records[key] = _Record(fingerprint, ttl, self._clock() + ttl, future)
        self._evict()
        return True

    async def wait(self, key: str) -> bytes | None:
        record = self._live(key)
        if record is None:
            return None
        # Shielded: one waiter giving up must not cancel the outcome for the others.
        outcome = await asyncio.shield(record.outcome)
        if record.abandoned:
            raise OutcomeUnknown(key)
        return outcome

    async def complete(self, key: str, outcome: bytes) -> None:
        record = self._records.get(key)
        if record is None or record.outcome.done():
            return
        record.outcome.set_result(outcome)
        record.expires_at = self._clock() + record.ttl
        self._records.move_to_end(key)

    async def release(self, key: str) -> None:
        record = self._records.get(key)
        if record is None or record.outcome.done():
            return
        del self._records[key]
        record.outcome.set_result(None)

    async def abandon(self, key: str) -> None:
        record = self._records.get(key)
        if record is None or record.outcome.done():
            return
        record.abandoned = True
        record.outcome.set_result(None)
        record.expires_at = self._clock() + record.ttl
        self._records.move_to_end(key)

    def _live(self, key: str) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.outcome.done() and record.expires_at <= self._clock():
            del self._records[key]
            return None
        return record

    def _evict(self) -> None:
        if len(self._records) <= self._max_entries:
            return
        now = self._clock()
        for key in [
            k for k, r in self._records.items() if r.expires_at <= now and r.outcome.done()
        ]:
            del self._records[key]
        while len(self._records) > self._max_entries:
            victim = next((k for k, r in self._records.items() if r.outcome.done()), None)
            if victim is None:
                return  # all running: bounded by the tools' concurrency anyway
            del self._records[victim]
