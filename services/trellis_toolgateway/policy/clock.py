"""Time as the policies see it: injectable, so tests drive cool-downs and TTLs by hand.

Policies take a ``Clock`` (monotonic seconds) and, where they wait, a ``Sleep``; the
defaults are the real ones. A fake clock makes "30 s later" a one-line test instead
of a 30 s test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

#: Monotonic seconds (``time.monotonic`` in production).
Clock = Callable[[], float]
#: Waits the given seconds (``asyncio.sleep`` in production).
Sleep = Callable[[float], Awaitable[None]]
