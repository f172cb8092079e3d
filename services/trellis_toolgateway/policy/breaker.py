"""Per-tool circuit breaker: stop calling a backend that keeps failing, probe it later.

A dead backend costs every caller a full timeout (and retries multiply that). The
breaker notices - N consecutive failures, or a high failure rate over the last calls -
and *opens*: calls fail at once with ``CIRCUIT_OPEN`` and the backend gets a rest.
After a cool-down it is *half-open*: exactly one probe call goes through; success
closes it, failure opens it again for another cool-down.

Only backend faults count (timeouts, crashes, retryable errors). The caller decides
what a result means (``Verdict``); contract violations are ``IGNORED`` so a client
sending bad arguments can never take a tool down for everyone.

Every admitted call holds a ``Permit`` stamped with the breaker's generation, which
changes on every state change: a slow call admitted before the breaker opened cannot
close it again when it finally succeeds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum

from trellis_toolgateway.policy.clock import Clock


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Verdict(Enum):
    """What one admitted call says about the backend's health."""

    SUCCESS = "success"
    FAILURE = "failure"
    #: Says nothing (contract violation, cancelled): not counted, frees a probe.
    IGNORED = "ignored"


@dataclass(frozen=True)
class BreakerConfig:
    #: Opens after this many failures in a row.
    consecutive_failures: int = 5
    #: ... or when ``failure_rate`` of the last ``window`` calls failed, with at
    #: least ``min_calls`` of them seen since the breaker last closed.
    window: int = 20
    min_calls: int = 10
    failure_rate: float = 0.5
    #: Seconds open before one probe call is let through.
    cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.window < 1 or self.min_calls < 1:
            raise ValueError("consecutive_failures, window and min_calls must be at least 1")
        if self.min_calls > self.window:
            raise ValueError("min_calls cannot exceed window")
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be in (0, 1]")
        if self.cooldown < 0:
            raise ValueError("cooldown must not be negative")


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; hand it back with ``CircuitBreaker.record``."""

    generation: int
    probe: bool


#: Called with (breaker name, new state) on every transition (logs, gauges).
OnChange = Callable[[str, BreakerState], None]


class CircuitBreaker:
    """One backend's breaker. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        name: str = "",
        clock: Clock = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        self.config = config or BreakerConfig()
        self.name = name
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._probing = False
        self._consecutive = 0
        self._window: deque[bool] = deque(maxlen=self.config.window)

    @property
    def state(self) -> BreakerState:
        """The state now; an open breaker whose cool-down is over reads as half-open."""
        if self._state is BreakerState.OPEN and self.retry_after() <= 0:
            return BreakerState.HALF_OPEN
        return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 unless open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.cooldown - self._clock())

    def allows(self) -> bool:
        """Whether ``acquire`` would admit a call now (changes nothing)."""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probing
        )

    def acquire(self) -> Permit | None:
        """A permit for one call, or None while open (or while the one probe runs)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self._generation, probe=False)
        if state is BreakerState.HALF_OPEN and not self._probing:
            if self._state is not BreakerState.HALF_OPEN:
                self._transition(BreakerState.HALF_OPEN)
            self._probing = True
            return Permit(self._generation, probe=True)
        return None

    def record(self, permit: Permit, verdict: Verdict) -> None:
        """Count the result of a call admitted with ``permit``."""
        current = permit.generation == self._generation
        if permit.probe and current:
            self._probing = False
        if not current or verdict is Verdict.IGNORED:
            return
        if permit.probe:
            self._transition(
                BreakerState.CLOSED if verdict is Verdict.SUCCESS else BreakerState.OPEN
            )
            return
        failed = verdict is Verdict.FAILURE
        self._window.append(failed)
        self._consecutive = self._consecutive + 1 if failed else 0
        if failed and (
            self._consecutive >= self.config.consecutive_failures or self._rate_exceeded()
        ):
            self._transition(BreakerState.OPEN)

    def _rate_exceeded(self) -> bool:
        seen = len(self._window)
        return seen >= self.config.min_calls and sum(self._window) >= (
            self.config.failure_rate * seen
        )

    def _transition(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._probing = False
        self._consecutive = 0
        self._window.clear()
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        if self._on_change is not None:
            self._on_change(self.name, state)


class Breakers:
    """One breaker per tool name, made on first use with the same config and clock."""

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        self._config = config or BreakerConfig()
        self._clock = clock
        self._on_change = on_change
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(
                self._config, name=name, clock=self._clock, on_change=self._on_change
            )
            self._breakers[name] = breaker
        return breaker

    def states(self) -> dict[str, BreakerState]:
        return {name: b.state for name, b in self._breakers.items()}
