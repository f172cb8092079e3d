"""Execution policy of the tool gateway, one concept per module.

``concurrency`` (max concurrent calls + bounded queue), ``breaker`` (per-tool
circuit breaker), ``retry`` (backoff with full jitter), ``idempotency`` (run-once
for side-effecting tools), ``singleflight`` (identical concurrent calls share one
run). None of them knows about gRPC or about tools' protos; the invoker composes them.
"""

from trellis_toolgateway.policy.breaker import (
    BreakerConfig,
    Breakers,
    BreakerState,
    CircuitBreaker,
    Permit,
    Verdict,
)
from trellis_toolgateway.policy.concurrency import ConcurrencyLimiter, Limiters
from trellis_toolgateway.policy.idempotency import (
    IdempotencyStore,
    KeyConflict,
    MemoryIdempotencyStore,
)
from trellis_toolgateway.policy.retry import Backoff
from trellis_toolgateway.policy.singleflight import SingleFlight

__all__ = [
    "Backoff",
    "BreakerConfig",
    "BreakerState",
    "Breakers",
    "CircuitBreaker",
    "ConcurrencyLimiter",
    "IdempotencyStore",
    "KeyConflict",
    "Limiters",
    "MemoryIdempotencyStore",
    "Permit",
    "SingleFlight",
    "Verdict",
]
