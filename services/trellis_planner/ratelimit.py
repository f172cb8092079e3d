"""Per-model rate limits: a requests/min and a tokens/min token bucket for each model.

Each limited bucket holds up to one minute's allowance (its burst) and refills at
``limit / 60`` per second. A call takes 1 from the requests bucket and its token cost
from the tokens bucket, both or neither, in one step.

Token cost of a call = the estimated input tokens (``estimate_tokens`` over the
messages, ~4 characters a token) + a fixed expected-output allowance
(``TRELLIS_MODEL_EXPECTED_OUTPUT_TOKENS``, default 256: a plan or an answer is a few
hundred tokens). The real output is unknown until the call ends and the planner sends
no ``max_tokens``, so a bound must be charged up front, as providers' own limiters do
(they count prompt + ``max_tokens`` on admission). It is not corrected afterwards: that
would be a second round trip to the shared store per call for a figure that is an
estimate anyway. A cost above a bucket's whole allowance is cut to it, so one big
prompt waits for a full bucket instead of never fitting.

Reservations: when a bucket is short, a caller that is willing to wait long enough
takes the tokens anyway (the bucket goes below zero) and is told how long to sleep
before calling; later callers queue behind that debt. So waiting callers are served
in order, none of them polls, and the wait returned is exact. A caller that cannot wait
that long (its deadline is nearer) takes nothing and gets the wait as RetryInfo. A caller
cancelled while it waits leaves its reservation taken: the limit errs on the safe side.

Backends (one ``RateLimiter`` protocol):

- ``InProcessRateLimiter``: a dict of buckets on the monotonic clock; one replica's own.
- ``RedisRateLimiter``: the same buckets as Redis hashes, checked and taken by ONE Lua
  script (atomic, one round trip) on Redis' own clock (``TIME``), so every planner
  replica shares them and replicas' clock skew does not matter. Both buckets of a model
  share a hash tag (``{model}``), so the script also runs on Redis Cluster. Keys expire
  once their bucket would be full again.

  Redis down or hung (socket timeouts of 0.25 s) → fail open to an in-process limiter
  with one warning per outage, and Redis is tried again after a few seconds: planning
  must never stop because Redis died. During an outage each replica enforces the limit
  on its own, so the fleet may send up to replicas x limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from trellis.runtime.errors import ResourceExhausted
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import MODEL_RATE_LIMITED
from trellis.runtime.redis_client import fail_fast_redis

log = get_logger(__name__)

DEFAULT_PREFIX = "trellis:ratelimit:"
#: Expected output tokens charged per call when nothing else is configured.
EXPECTED_OUTPUT_TOKENS = 256
#: Socket and connect timeout of the Redis client: a dead Redis delays a call ~2x this.
REDIS_TIMEOUT_SECONDS = 0.25
#: After a Redis failure the in-process limiter is used this long before Redis is retried.
REDIS_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class Limit:
    """A model's allowance per ``period`` seconds; 0 = that dimension is unlimited."""

    requests: int = 0
    tokens: int = 0
    period: float = 60.0

    @property
    def unlimited(self) -> bool:
        return not (self.requests or self.tokens)

    def buckets(self, tokens: int) -> list[tuple[str, int, int]]:
        """``(kind, capacity, cost)`` of each limited bucket for a call of ``tokens``."""
        out = []
        if self.requests:
            out.append(("requests", self.requests, 1))
        if self.tokens:
            out.append(("tokens", self.tokens, max(0, min(tokens, self.tokens))))
        return out


@dataclass(frozen=True)
class Decision:
    """``granted``: sleep ``wait`` seconds, then call. Refused: it would fit in ``wait``."""

    granted: bool
    wait: float


class RateLimiter(Protocol):
    """Token buckets of every model, in one place (this process, or Redis)."""

    backend: str

    async def reserve(self, model: str, tokens: int, limit: Limit, *, max_wait: float) -> Decision:
        """Take one request and ``tokens`` from ``model``'s buckets if the call can run
        within ``max_wait`` seconds; else take nothing."""
        ...

    async def aclose(self) -> None: ...


class InProcessRateLimiter:
    """Buckets in a dict: exact for one process, not shared with other replicas."""

    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: (model, kind) -> (level, when it was computed)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    async def reserve(self, model: str, tokens: int, limit: Limit, *, max_wait: float) -> Decision:
        now = self._clock()
        wait, levels = 0.0, []
        for kind, capacity, cost in limit.buckets(tokens):
            rate = capacity / limit.period
            level, at = self._buckets.get((model, kind), (float(capacity), now))
            level = min(float(capacity), level + max(0.0, now - at) * rate)
            if level < cost:
                wait = max(wait, (cost - level) / rate)
            levels.append(((model, kind), level - cost))
        if wait > max_wait:
            return Decision(False, wait)
        for key, level in levels:
            self._buckets[key] = (level, now)
        return Decision(True, wait)

    async def aclose(self) -> None:
        return None


# KEYS: one bucket hash per limited kind. ARGV[1] max wait (s), ARGV[2] period (s), then
# capacity and cost for each key. Returns {granted 0|1, wait seconds as a string}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local max_wait = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local wait = 0
local levels = {}
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[1 + 2 * i])
  local cost = tonumber(ARGV[2 + 2 * i])
  local rate = capacity / period
  local state = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(state[1]) or capacity
  local at = tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - at) * rate)
  if level < cost then
    wait = math.max(wait, (cost - level) / rate)
  end
  levels[i] = level - cost
end
if wait > max_wait then
  return {0, string.format('%.6f', wait)}
end
local ttl = math.ceil((period + wait) * 1000) + 1000
local stamp = string.format('%.6f', now)
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'level', string.format('%.6f', levels[i]), 'at', stamp)
  redis.call('PEXPIRE', key, ttl)
end
return {1, string.format('%.6f', wait)}
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by every planner replica; in-process while Redis is down."""

    backend = "redis"

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        fallback: RateLimiter | None = None,
        retry_seconds: float = REDIS_RETRY_SECONDS,
    ) -> None:
        self.client = client
        self._prefix = prefix
        self._script = client.register_script(_RESERVE)
        self._fallback = fallback or InProcessRateLimiter()
        self._retry_seconds = retry_seconds
        self._down_until = 0.0
        self._healthy = True

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> RedisRateLimiter:
        return cls(
            fail_fast_redis(
                url, timeout=REDIS_TIMEOUT_SECONDS, client_name="trellis-planner-ratelimit"
            ),
            **kwargs,
        )  # type: ignore[arg-type]

    def key(self, model: str, kind: str) -> str:
        return f"{self._prefix}{{{model}}}:{kind}"

    async def reserve(self, model: str, tokens: int, limit: Limit, *, max_wait: float) -> Decision:
        buckets = limit.buckets(tokens)
        if not buckets:
            return Decision(True, 0.0)
        if time.monotonic() < self._down_until:
            return await self._fallback.reserve(model, tokens, limit, max_wait=max_wait)
        args: list[float | int] = [max(0.0, max_wait), limit.period]
        for _kind, capacity, cost in buckets:
            args += [capacity, cost]
        try:
            granted, wait = await self._script(
                keys=[self.key(model, kind) for kind, _, _ in buckets], args=args
            )
        except (RedisError, OSError) as error:  # OSError: a socket error redis-py let through
            self._down_until = time.monotonic() + self._retry_seconds
            if self._healthy:
                self._healthy = False
                log.warning(
                    "redis unavailable: model rate limits are per process until it is back",
                    error=f"{type(error).__name__}: {error}",
                )
            return await self._fallback.reserve(model, tokens, limit, max_wait=max_wait)
        if not self._healthy:
            self._healthy = True
            log.info("redis available again: model rate limits are shared")
        return Decision(bool(int(granted)), float(wait))

    async def aclose(self) -> None:
        await self.client.aclose()


class RateLimits:
    """Which limit each model has, and the admission of one call against it."""

    def __init__(
        self,
        limiter: RateLimiter,
        *,
        default: Limit = Limit(),
        per_model: Mapping[str, Limit] | None = None,
        expected_output_tokens: int = EXPECTED_OUTPUT_TOKENS,
    ) -> None:
        self.limiter = limiter
        self._default = default
        self._per_model = dict(per_model or {})
        self._expected_output = expected_output_tokens

    def limit(self, model: str) -> Limit:
        return self._per_model.get(model, self._default)

    def cost(self, input_tokens: int) -> int:
        """Tokens a call is charged: its estimated input + the expected output."""
        return input_tokens + self._expected_output

    async def admit(self, model: str, input_tokens: int, *, max_wait: float) -> float:
        """Wait until a call to ``model`` fits its limits; the seconds waited.

        Raises RESOURCE_EXHAUSTED (MODEL_RATE_LIMITED, with RetryInfo) when it would not
        fit within ``max_wait`` seconds (the call's remaining deadline).
        """
        limit = self.limit(model)
        if limit.unlimited:
            return 0.0
        tokens = self.cost(input_tokens)
        decision = await self.limiter.reserve(model, tokens, limit, max_wait=max(0.0, max_wait))
        if not decision.granted:
            MODEL_RATE_LIMITED.labels(model, "rejected").inc()
            raise ResourceExhausted(
                f"model {model} is over its rate limit "
                f"({limit.requests} requests, {limit.tokens} tokens per {limit.period:g} s); "
                f"retry in {decision.wait:.1f} s",
                reason="MODEL_RATE_LIMITED",
                metadata={"model": model, "limiter": self.limiter.backend},
                retry_delay=decision.wait,
            )
        if decision.wait > 0:
            MODEL_RATE_LIMITED.labels(model, "waited").inc()
            await asyncio.sleep(decision.wait)
        return decision.wait

    async def aclose(self) -> None:
        await self.limiter.aclose()
