"""Backoff between attempts of a retryable tool failure: exponential, full jitter.

Full jitter (a uniform delay between 0 and the exponential cap, as in the AWS
architecture blog's "Exponential Backoff and Jitter") spreads the retries of many
callers that failed together, so a backend that just came back is not hit by all of
them at the same instant. Whether to retry at all, and whether the delay still fits
in the caller's deadline, is the invoker's decision; this only says how long to wait.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    #: Cap of the delay before the first retry, seconds.
    initial: float = 0.1
    #: Growth of the cap per retry.
    multiplier: float = 2.0
    #: Largest cap, seconds.
    maximum: float = 5.0

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < 0 or self.multiplier < 1:
            raise ValueError("initial and maximum must be >= 0 and multiplier >= 1")

    def cap(self, retry: int) -> float:
        """Upper bound of the delay before retry number ``retry`` (1 = the first retry)."""
        exponent = max(retry - 1, 0)
        # Stop growing once past the maximum (and before floats overflow).
        if self.initial <= 0 or exponent > 64:
            return self.maximum if self.initial > 0 else 0.0
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """A full-jitter delay: uniform in [0, ``cap(retry)``]."""
        return (rng or random).uniform(0.0, self.cap(retry))
