"""Refresh-ahead: which cache hits start a background refresh of their entry.

A tool with ``refresh_ahead: f`` has its cached result refreshed when a hit finds it in
the last ``f`` of its TTL: the hit is answered at once from the entry, and one refresh
runs in the background, so a key read often never goes cold. "One" is what this class
keeps true in a process:

- while a refresh of a key runs, hits start no other (``claim``);
- once it has stored the new entry, a hit whose cache read started *before* that may
  still have seen the old entry in its window; it starts nothing either (each read
  takes a ``ticket`` first, and the store takes the next one);
- a refresh that failed leaves the old entry to expire: hits on it start no retry (the
  tool's breaker and retries are the place for that); the next miss runs the tool.

Gateway replicas do not coordinate: two replicas whose hits land in the same window
before either refresh is stored may refresh the same key once each.
"""

from __future__ import annotations

import itertools
import time

#: Keys remembered after their refresh; beyond it the oldest are forgotten (a read
#: that started before thousands of later refreshes ended is not in flight any more).
_REMEMBERED = 4096


def refresh_due(fraction: float, ttl: float, ttl_left: float) -> bool:
    """Whether an entry with ``ttl_left`` of ``ttl`` is in its refresh-ahead window."""
    return fraction > 0 and ttl > 0 and ttl_left <= fraction * ttl


class RefreshAhead:
    """Refreshes under way and finished, per cache key (see the module docstring)."""

    def __init__(self) -> None:
        self._tickets = itertools.count(1)
        self._running: set[str] = set()
        #: Key -> the ticket taken when its refresh was stored.
        self._stored: dict[str, int] = {}
        #: Key -> when the entry whose refresh failed expires (time.monotonic).
        self._failed: dict[str, float] = {}

    def ticket(self) -> int:
        """Taken just before a cache read: orders it against refreshes being stored."""
        return next(self._tickets)

    def claim(self, key: str, ticket: int) -> bool:
        """Whether the hit whose read of ``key`` took ``ticket`` starts its refresh
        (then ``stored`` or ``failed`` must follow)."""
        if key in self._running or ticket <= self._stored.get(key, 0):
            return False
        if time.monotonic() < self._failed.get(key, float("-inf")):
            return False
        self._running.add(key)
        return True

    def stored(self, key: str) -> None:
        """The refresh of ``key`` stored a new entry."""
        self._running.discard(key)
        self._failed.pop(key, None)
        self._stored.pop(key, None)  # re-inserted last: the dict stays oldest-first
        self._stored[key] = self.ticket()
        if len(self._stored) > _REMEMBERED:
            del self._stored[next(iter(self._stored))]

    def failed(self, key: str, *, expires_at: float) -> None:
        """The refresh of ``key`` failed; its entry (expiring at ``expires_at``,
        time.monotonic) is left to expire."""
        self._running.discard(key)
        self._failed[key] = expires_at
        if len(self._failed) > _REMEMBERED:
            now = time.monotonic()
            for old in [k for k, until in self._failed.items() if until <= now]:
                del self._failed[old]

    @property
    def running(self) -> int:
        return len(self._running)
