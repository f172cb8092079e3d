"""Per-model circuit breakers: a model that keeps failing is skipped for a cool-down.

Without a breaker every call retries a dead model (the openai client's retries, then the
fallback): with two retries that is three failed requests and seconds of backoff added
to every call, of every run. A model whose calls failed ``failures`` times in a row
(MODEL_UNAVAILABLE, MODEL_TIMEOUT, MODEL_BAD_RESPONSE: the endpoint is down or broken)
*opens*: calls skip it for the next of ``TRELLIS_FALLBACK_MODELS`` at once, for
``cooldown`` seconds. Then it is *half-open*: one call (the probe) tries it again;
success closes it, failure opens it for another cool-down. A call that says nothing
about the model's health (rate limited, the caller's deadline, cancelled) is not
counted; a rejected request (4xx) counts as the endpoint being up.

The state is shared across calls and runs of the process, and across replicas through
Redis when ``TRELLIS_REDIS_URL`` is set (one hash per model, updated by one Lua script
per step on Redis' clock, like the rate limits). A probe holds a lease (``PROBE_SECONDS``)
so a replica that dies mid-probe does not keep the model closed to everyone. Redis down
or hung: each replica keeps its own breakers until it is back (one warning per outage).
``trellis_model_breaker_state{model}`` is what this process last saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import MODEL_BREAKER_STATE
from trellis.runtime.redis_client import fail_fast_redis

log = get_logger(__name__)

#: Failures that say the model's endpoint is down or broken.
BREAKER_FAILURES = frozenset({"MODEL_UNAVAILABLE", "MODEL_TIMEOUT", "MODEL_BAD_RESPONSE"})
#: Failures that say nothing about its health.
BREAKER_NEUTRAL = frozenset({"MODEL_RATE_LIMITED", "DEADLINE_EXCEEDED"})
#: Longest a probe keeps the half-open model to itself (a dead replica's lease lapses).
PROBE_SECONDS = 60.0
DEFAULT_PREFIX = "trellis:model-breaker:"
REDIS_TIMEOUT_SECONDS = 0.25
REDIS_RETRY_SECONDS = 5.0

_GAUGE = {"closed": 0, "half_open": 1, "open": 2}


class Verdict(Enum):
    OK = "ok"
    FAIL = "fail"
    #: Says nothing about the model (frees a probe).
    NEUTRAL = "neutral"


def verdict_of(reason: str | None) -> Verdict:
    """What a call that ended with ``reason`` (None: it answered) says about the model."""
    if reason is None:
        return Verdict.OK
    if reason in BREAKER_FAILURES:
        return Verdict.FAIL
    if reason in BREAKER_NEUTRAL:
        return Verdict.NEUTRAL
    return Verdict.OK  # the endpoint answered (a 4xx, a refusal): it is up


@dataclass(frozen=True)
class Admission:
    """Whether a call may try the model now; ``probe``: it is the half-open probe."""

    allowed: bool
    probe: bool = False
    #: Seconds until the model may be tried again (when not allowed).
    retry_after: float = 0.0


ALLOWED = Admission(True)


@dataclass(frozen=True)
class BreakerConfig:
    #: Failures in a row that open a model's breaker; 0 turns breakers off.
    failures: int = 3
    #: Seconds an open breaker skips its model before one probe call tries it.
    cooldown: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.failures > 0


def _show(model: str, state: str) -> None:
    MODEL_BREAKER_STATE.labels(model).set(_GAUGE[state])


class ModelBreakers(Protocol):
    backend: str

    async def admit(self, model: str) -> Admission: ...

    async def record(self, model: str, admission: Admission, verdict: Verdict) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0  # 0: closed
    probing_until: float = 0.0


class InProcessBreakers:
    """Breakers of this process only."""

    backend = "memory"

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._states: dict[str, _State] = {}

    async def admit(self, model: str) -> Admission:
        state = self._states.get(model)
        if state is None or not state.open_until:
            return ALLOWED
        now = self._clock()
        if now < state.open_until:
            return Admission(False, retry_after=state.open_until - now)
        if now < state.probing_until:
            return Admission(False, retry_after=state.probing_until - now)
        state.probing_until = now + PROBE_SECONDS
        _show(model, "half_open")
        return Admission(True, probe=True)

    async def record(self, model: str, admission: Admission, verdict: Verdict) -> None:
        state = self._states.setdefault(model, _State())
        if admission.probe:
            state.probing_until = 0.0
        if verdict is Verdict.NEUTRAL:
            if admission.probe:  # the next call may probe
                _show(model, "half_open")
            return
        if verdict is Verdict.OK:
            if admission.probe or not state.open_until:
                if state.open_until:
                    log.info("model breaker closed", model=model)
                self._states.pop(model, None)
                _show(model, "closed")
            return
        if admission.probe or (not state.open_until and state.failures + 1 >= self.config.failures):
            self._open(model, state)
        elif not state.open_until:
            state.failures += 1

    def _open(self, model: str, state: _State) -> None:
        state.failures = 0
        state.open_until = self._clock() + self.config.cooldown
        _show(model, "open")
        log.warning("model breaker open", model=model, cooldown_s=self.config.cooldown)

    async def aclose(self) -> None:
        return None


# KEYS[1] the model's hash. ARGV[1] probe lease (s). Returns {allowed 0|1, probe 0|1,
# retry_after (s) as a string}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until == 0 then return {1, 0, '0'} end
if now < open_until then return {0, 0, string.format('%.3f', open_until - now)} end
local probing = tonumber(redis.call('HGET', KEYS[1], 'probing_until') or '0')
if now < probing then return {0, 0, string.format('%.3f', probing - now)} end
redis.call('HSET', KEYS[1], 'probing_until', string.format('%.6f', now + tonumber(ARGV[1])))
return {1, 1, '0'}
"""

# KEYS[1] the model's hash. ARGV: verdict (ok|fail|neutral), probe (0|1), failures that
# open it, cool-down (s). Returns the state after: closed | open | half_open | unchanged.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local verdict, probe = ARGV[1], ARGV[2] == '1'
local limit, cooldown = tonumber(ARGV[3]), tonumber(ARGV[4])
if probe then redis.call('HDEL', KEYS[1], 'probing_until') end
if verdict == 'neutral' then
  if probe then return 'half_open' end
  return 'unchanged'
end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if verdict == 'ok' then
  if probe or open_until == 0 then
    redis.call('DEL', KEYS[1])
    return 'closed'
  end
  return 'unchanged'
end
if not probe and open_until ~= 0 then return 'unchanged' end
local failures = 1
if not probe then failures = redis.call('HINCRBY', KEYS[1], 'failures', 1) end
if probe or failures >= limit then
  redis.call('HSET', KEYS[1], 'open_until', string.format('%.6f', now + cooldown), 'failures', 0)
  redis.call('PEXPIRE', KEYS[1], math.ceil((cooldown + 3600) * 1000))
  return 'open'
end
redis.call('PEXPIRE', KEYS[1], math.ceil((cooldown + 3600) * 1000))
return 'unchanged'
"""


class RedisBreakers:
    """Breakers in Redis, shared by every planner replica; in-process while it is down."""

    backend = "redis"

    def __init__(
        self,
        client: redis.Redis,
        config: BreakerConfig,
        *,
        prefix: str = DEFAULT_PREFIX,
        retry_seconds: float = REDIS_RETRY_SECONDS,
    ) -> None:
        self.client = client
        self.config = config
        self._prefix = prefix
        self._admit = client.register_script(_ADMIT)
        self._record = client.register_script(_RECORD)
        self._fallback = InProcessBreakers(config)
        self._retry_seconds = retry_seconds
        self._down_until = 0.0
        self._healthy = True

    @classmethod
    def from_url(cls, url: str, config: BreakerConfig, **kwargs: object) -> RedisBreakers:
        client = fail_fast_redis(
            url, timeout=REDIS_TIMEOUT_SECONDS, client_name="trellis-planner-breakers"
        )
        return cls(client, config, **kwargs)  # type: ignore[arg-type]

    def key(self, model: str) -> str:
        return f"{self._prefix}{{{model}}}"

    def _down(self, error: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_seconds
        if self._healthy:
            self._healthy = False
            log.warning(
                "redis unavailable: model breakers are per process until it is back",
                error=f"{type(error).__name__}: {error}",
            )

    def _up(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.info("redis available again: model breakers are shared")

    async def admit(self, model: str) -> Admission:
        if time.monotonic() < self._down_until:
            return await self._fallback.admit(model)
        try:
            allowed, probe, wait = await self._admit(keys=[self.key(model)], args=[PROBE_SECONDS])
        except (RedisError, OSError) as error:
            self._down(error)
            return await self._fallback.admit(model)
        self._up()
        admission = Admission(bool(int(allowed)), bool(int(probe)), float(wait))
        if admission.probe:
            _show(model, "half_open")
        elif not admission.allowed:
            _show(model, "open")
        return admission

    async def record(self, model: str, admission: Admission, verdict: Verdict) -> None:
        if time.monotonic() < self._down_until:
            await self._fallback.record(model, admission, verdict)
            return
        args = [verdict.value, int(admission.probe), self.config.failures, self.config.cooldown]
        try:
            state = await self._record(keys=[self.key(model)], args=args)
        except (RedisError, OSError) as error:
            self._down(error)
            await self._fallback.record(model, admission, verdict)
            return
        self._up()
        state = state.decode() if isinstance(state, bytes) else str(state)
        if state != "unchanged":
            _show(model, state)
        if state == "open" and verdict is Verdict.FAIL:
            log.warning("model breaker open", model=model, cooldown_s=self.config.cooldown)

    async def aclose(self) -> None:
        await self.client.aclose()
