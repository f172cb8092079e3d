"""The gateway's run-once memory shared by its replicas: an ``IdempotencyStore`` in Redis.

The in-memory store (``policy.idempotency``) forgets every key when the gateway
restarts and is not seen by its other replicas, so a side-effecting call retried
after a restart, or on another replica, would run again. This store keeps the keys
in Redis (``TRELLIS_REDIS_URL`` on the gateway; ``open_idempotency_store`` chooses).

Layout, under ``prefix`` (default ``trellis:idem:``), for each scoped key:

- ``<prefix>{<key>}``: a hash ``{s: state, f: argument fingerprint, o: owner token,
  t: TTL in ms, v: outcome}``, state ``p`` (claimed, running), ``d`` (done: ``v`` is the
  outcome) or ``u`` (abandoned: the outcome is unknown). It lives for the TTL
  (24 h by default), counted again from the outcome.
- ``<prefix>{<key>}:lease``: the owner's token with a short TTL (the *lease*), renewed
  every third of it while the call runs. The braces keep both keys in one slot.

``claim`` is one Lua script doing ``SET NX`` on the hash and the lease together;
``complete``/``release``/``abandon`` are scripts that act only for the owner's token
(a stale owner cannot overwrite another's outcome). A waiter polls (every 20 ms at
first, backing off to 250 ms): done gives the outcome, a missing hash lets it claim,
and a claimed key whose lease is gone - the owner's process died mid-call, so its
side effect may or may not have happened - is ``OutcomeUnknown``: at most once. The
gateway answers such a call FAILED with ``IDEMPOTENCY_UNKNOWN`` and never runs it again
for that key (deleting ``<prefix>{<key>}`` by hand re-arms it).

Redis failures raise ``StoreUnavailable``: the gateway fails side-effecting calls with
``UNAVAILABLE`` then (fail closed: without the store, run-once cannot be promised);
other tools never touch this store. The guarantee lasts as long as Redis keeps its
data: a Redis restarted empty (no AOF/RDB, no replica) forgets every key.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

from trellis.runtime.logs import get_logger
from trellis.runtime.redis_client import fail_fast_redis
from trellis_toolgateway.policy.idempotency import (
    IdempotencyStore,
    KeyConflict,
    MemoryIdempotencyStore,
    OutcomeUnknown,
    StoreUnavailable,
)

log = get_logger(__name__)

DEFAULT_PREFIX = "trellis:idem:"
DEFAULT_LEASE = 10.0
#: Polling of a waiter: first delay, doubling up to the cap.
POLL_FIRST, POLL_CAP = 0.02, 0.25

# KEYS: record, lease. ARGV: fingerprint, owner, lease_ms, ttl_ms.
_CLAIM = """
local fingerprint = redis.call('HGET', KEYS[1], 'f')
if fingerprint then
  if fingerprint ~= ARGV[1] then return 'conflict' end
  return 'taken'
end
redis.call('HSET', KEYS[1], 's', 'p', 'f', ARGV[1], 'o', ARGV[2], 't', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 'claimed'
"""

# KEYS: record, lease. Returns {state} or {'d', outcome}; a claim without lease is 'u'.
_PEEK = """
local record = redis.call('HMGET', KEYS[1], 's', 'v')
local state = record[1]
if not state then return {'none'} end
if state == 'd' then return {'d', record[2]} end
if state == 'p' and redis.call('EXISTS', KEYS[2]) == 1 then return {'p'} end
return {'u'}
"""

# KEYS: record, lease. ARGV: owner, lease_ms. 1 while the owner holds a running claim.
_RENEW = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] or redis.call('HGET', KEYS[1], 's') ~= 'p' then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: record, lease. ARGV: owner, outcome. The record lives its TTL from now.
_COMPLETE = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 's', 'd', 'v', ARGV[2])
redis.call('PEXPIRE', KEYS[1], redis.call('HGET', KEYS[1], 't'))
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: record, lease. ARGV: owner, 'release' or 'abandon'. Only a running claim.
_LET_GO = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] or redis.call('HGET', KEYS[1], 's') ~= 'p' then
  return 0
end
if ARGV[2] == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 's', 'u')
end
redis.call('DEL', KEYS[2])
return 1
"""


@dataclass
class _Claim:
    """A key this process owns: its token and the task renewing its lease."""

    token: str
    renewal: asyncio.Task[None]


class RedisIdempotencyStore:
    """``IdempotencyStore`` over Redis, shared by every gateway replica using ``prefix``.

    ``lease`` bounds how long a dead owner's claim blocks its key before waiters learn
    that its outcome is unknown; it is renewed every ``lease / 3`` while the call runs.
    """

    def __init__(
        self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX, lease: float = DEFAULT_LEASE
    ) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty")
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.client = client
        self._prefix = prefix
        self._lease = lease
        self._claim = client.register_script(_CLAIM)
        self._peek = client.register_script(_PEEK)
        self._renew = client.register_script(_RENEW)
        self._complete = client.register_script(_COMPLETE)
        self._let_go = client.register_script(_LET_GO)
        self._owned: dict[str, _Claim] = {}

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float, prefix: str = DEFAULT_PREFIX, lease: float = DEFAULT_LEASE
    ) -> RedisIdempotencyStore:
        client = fail_fast_redis(url, timeout=timeout, client_name="trellis-toolgateway")
        return cls(client, prefix=prefix, lease=lease)

    def _keys(self, key: str) -> list[str]:
        record = f"{self._prefix}{{{key}}}"
        return [record, f"{record}:lease"]

    @property
    def owned(self) -> int:
        """Keys this process holds a running claim on (their leases are being renewed)."""
        return len(self._owned)

    async def claim(self, key: str, fingerprint: str, ttl: float) -> bool:
        token = uuid.uuid4().hex
        args = [fingerprint, token, _ms(self._lease), _ms(ttl)]
        with _failures("claim"):
            answer = await self._claim(keys=self._keys(key), args=args)
        if answer == b"conflict":
            raise KeyConflict(key)
        if answer != b"claimed":
            return False
        renewal = asyncio.create_task(self._keep(key, token), name=f"idempotency-lease:{key}")
        self._owned[key] = _Claim(token, renewal)
        return True

    async def wait(self, key: str) -> bytes | None:
        delay = POLL_FIRST
        while True:
            with _failures("wait"):
                state, *rest = await self._peek(keys=self._keys(key))
            if state == b"none":
                return None
            if state == b"d":
                return bytes(rest[0])
            if state == b"u":
                raise OutcomeUnknown(key)
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_CAP)

    async def complete(self, key: str, outcome: bytes) -> None:
        token = self._end_claim(key)
        if token is None:
            return
        with _failures("complete"):
            done = await self._complete(keys=self._keys(key), args=[token, outcome])
        if not done:
            log.warning("idempotency key lost before its outcome was stored", key=key)

    async def release(self, key: str) -> None:
        await self._give_up(key, "release")

    async def abandon(self, key: str) -> None:
        await self._give_up(key, "abandon")

    async def _give_up(self, key: str, how: str) -> None:
        token = self._end_claim(key)
        if token is None:
            return
        with _failures(how):
            await self._let_go(keys=self._keys(key), args=[token, how])

    def _end_claim(self, key: str) -> str | None:
        """Stop renewing ``key``'s lease; its token, or None if this store does not hold
        it (closed meanwhile: the lease runs out and the key reads as unknown). If the
        write that follows fails, the same happens."""
        claim = self._owned.pop(key, None)
        if claim is None:
            log.warning("idempotency key is not held here any more", key=key)
            return None
        claim.renewal.cancel()
        return claim.token

    async def _keep(self, key: str, token: str) -> None:
        """Renew the lease of ``key`` every third of it until the claim ends; a failed
        renewal is tried again next time (the lease may run out meanwhile)."""
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                held = await self._renew(keys=self._keys(key), args=[token, _ms(self._lease)])
            except RedisError as error:
                log.warning("idempotency lease renewal failed", key=key, error=str(error))
                continue
            if not held:
                log.warning("idempotency key no longer held", key=key)
                return

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless Redis answers (a start-up check)."""
        with _failures("ping"):
            await self.client.ping()

    async def aclose(self) -> None:
        """Stop renewing (claims still running become unknown when their leases end)."""
        claims, self._owned = list(self._owned.values()), {}
        for claim in claims:
            claim.renewal.cancel()
        await asyncio.gather(*(c.renewal for c in claims), return_exceptions=True)
        await self.client.aclose()


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@contextmanager
def _failures(operation: str) -> Iterator[None]:
    try:
        yield
    except RedisError as error:
        raise StoreUnavailable(f"idempotency store {operation} failed: {error}") from error


def open_idempotency_store(
    redis_url: str,
    *,
    timeout: float,
    lease: float = DEFAULT_LEASE,
    prefix: str = DEFAULT_PREFIX,
) -> IdempotencyStore:
    """Redis when ``redis_url`` is set (shared by replicas, survives restarts), else the
    in-process store (one replica; a restart forgets every key)."""
    if not redis_url:
        return MemoryIdempotencyStore()
    return RedisIdempotencyStore.from_url(redis_url, timeout=timeout, prefix=prefix, lease=lease)
