"""Redis backend of the cache: several cache replicas share one set of entries and stats.

Layout, every key under ``prefix`` (default ``trellis:cache:``) so a shared Redis can
hold other data and ``prefix`` isolates deployments:

- ``<prefix>entry:<key>``: a hash ``{v: value, t: JSON list of tags}`` with the entry's
  TTL as the Redis TTL (PEXPIRE), so Redis expires entries, not us.
- ``<prefix>tag:<tag>``: a set of the keys carrying ``tag``; its TTL is extended to cover
  its longest-lived member, so a tag set never outlives its entries for long.
- ``<prefix>stats``: a hash of ``hits`` and ``misses`` (HINCRBY), shared by all replicas.

Each operation is one small Lua script (one round trip, atomic): Set replaces an entry
*and* its tag memberships; Invalidate by tag is SMEMBERS + DEL done server-side, by tag
group (entries carrying every tag of the group) SINTER of the groups' sets. Storing
the entry's own tags in the entry lets a tag invalidation skip a key whose stale
membership outlived the entry it was set for (expired, then set again with other tags).
The scripts touch keys they derive from ``prefix`` (not only ``KEYS``): fine on a single
Redis or behind Sentinel, not on Redis Cluster.

Stats: ``entries`` and ``bytes`` come from SCAN over ``<prefix>entry:*`` (with HSTRLEN of
each value, so bytes are values only, not Redis overhead). SCAN instead of a tracked
index because an index drifts whenever Redis expires or evicts keys behind our back,
while SCAN skips expired keys and so is exact; the price is O(entries) per GetStats,
an operator call, never on the hot path. ``evictions`` is Redis' own ``evicted_keys``
(INFO stats): with Redis as the backend, Redis' maxmemory policy does the evicting
(``volatile-lru`` or ``allkeys-lru``; every entry has a TTL), so only Redis can count
it, server-wide.

Failures: any Redis error becomes ``Unavailable(reason="CACHE_BACKEND_UNAVAILABLE")``.
Socket timeouts and one quick retry bound how long a dead Redis can hold a call; redis-py
drops a broken connection from its pool and connects anew on the next call, and
re-loads the scripts after a restart (NOSCRIPT), so the service recovers by itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.exceptions import RedisError

from trellis.runtime.errors import Unavailable
from trellis.runtime.logs import get_logger
from trellis.runtime.redis_client import fail_fast_redis
from trellis_cache.store import Stats

log = get_logger(__name__)

BACKEND_UNAVAILABLE = "CACHE_BACKEND_UNAVAILABLE"
DEFAULT_PREFIX = "trellis:cache:"
_SCAN_COUNT = 1000

# KEYS[1] entry, KEYS[2] stats. Returns nil on a miss, else {value, pttl_ms}.
_GET = """
local value = redis.call('HGET', KEYS[1], 'v')
if not value then
  redis.call('HINCRBY', KEYS[2], 'misses', 1)
  return false
end
redis.call('HINCRBY', KEYS[2], 'hits', 1)
return {value, redis.call('PTTL', KEYS[1])}
"""

# KEYS[1] entry. ARGV: prefix, key, value, ttl_ms, tags (JSON list).
_SET = """
local prefix, key, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4])
local old = redis.call('HGET', KEYS[1], 't')
if old then
  for _, tag in ipairs(cjson.decode(old)) do
    redis.call('SREM', prefix .. 'tag:' .. tag, key)
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[3], 't', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
for _, tag in ipairs(cjson.decode(ARGV[5])) do
  local tag_key = prefix .. 'tag:' .. tag
  redis.call('SADD', tag_key, key)
  if redis.call('PTTL', tag_key) < ttl then  -- -1 (no TTL yet) included
    redis.call('PEXPIRE', tag_key, ttl)
  end
end
return 1
"""

# ARGV: prefix, keys, tags, groups (JSON lists; a group is a list of tags). Returns how
# many entries went. A group's members are SINTER of its tag sets.
_INVALIDATE = """
local prefix = ARGV[1]
local removed = 0
local function carries_all(tags, wanted)
  for _, w in ipairs(wanted) do
    local found = false
    for _, tag in ipairs(tags) do
      if tag == w then found = true break end
    end
    if not found then return false end
  end
  return true
end
local function drop(key, wanted)
  local entry = prefix .. 'entry:' .. key
  local encoded = redis.call('HGET', entry, 't')
  if not encoded then return end
  local tags = cjson.decode(encoded)
  -- a stale membership: the entry was set anew without (all of) these tags
  if wanted and not carries_all(tags, wanted) then return end
  for _, tag in ipairs(tags) do
    redis.call('SREM', prefix .. 'tag:' .. tag, key)
  end
  redis.call('DEL', entry)
  removed = removed + 1
end
for _, key in ipairs(cjson.decode(ARGV[2])) do drop(key, nil) end
for _, tag in ipairs(cjson.decode(ARGV[3])) do
  local tag_key = prefix .. 'tag:' .. tag
  for _, key in ipairs(redis.call('SMEMBERS', tag_key)) do drop(key, {tag}) end
  redis.call('DEL', tag_key)
end
for _, group in ipairs(cjson.decode(ARGV[4])) do
  local tag_keys = {}
  for i, tag in ipairs(group) do tag_keys[i] = prefix .. 'tag:' .. tag end
  for _, key in ipairs(redis.call('SINTER', unpack(tag_keys))) do drop(key, group) end
end
return removed
"""


def redacted(url: str) -> str:
    """``url`` without its credentials, for logs."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


class RedisStore:
    """``Store`` over ``redis.asyncio``; shared by every cache replica using the same prefix."""

    backend = "redis"

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty")
        self.client = client
        self._prefix = prefix
        self._stats_key = f"{prefix}stats"
        self._entry_pattern = _glob_escape(f"{prefix}entry:") + "*"
        self._get = client.register_script(_GET)
        self._set = client.register_script(_SET)
        self._invalidate = client.register_script(_INVALIDATE)
        self._healthy = True

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX, timeout: float) -> RedisStore:
        return cls(
            fail_fast_redis(url, timeout=timeout, client_name="trellis-cache"), prefix=prefix
        )

    def _entry(self, key: str) -> str:
        return f"{self._prefix}entry:{key}"

    async def get(self, key: str) -> tuple[bytes, float] | None:
        with self._failures("get"):
            found = await self._get(keys=[self._entry(key), self._stats_key])
        if found is None:
            return None
        value, ttl_ms = found
        return bytes(value), max(int(ttl_ms), 0) / 1000

    async def set(self, key: str, value: bytes, ttl: float, tags: Iterable[str] = ()) -> None:
        ttl_ms = max(1, math.ceil(ttl * 1000))
        encoded_tags = json.dumps(sorted(set(tags)))
        args = [self._prefix, key, value, ttl_ms, encoded_tags]
        with self._failures("set"):
            await self._set(keys=[self._entry(key)], args=args)

    async def invalidate(
        self,
        keys: Iterable[str] = (),
        tags: Iterable[str] = (),
        groups: Iterable[Sequence[str]] = (),
    ) -> int:
        args = [
            self._prefix,
            json.dumps(sorted(set(keys))),
            json.dumps(sorted(set(tags))),
            json.dumps([sorted(set(group)) for group in groups if group]),
        ]
        with self._failures("invalidate"):
            return int(await self._invalidate(keys=[], args=args))

    async def stats(self) -> Stats:
        with self._failures("stats"):
            hits, misses = await self.client.hmget(self._stats_key, ["hits", "misses"])
            entries, size = await self._scan_entries()
            info = await self.client.info("stats")
        return Stats(
            hits=int(hits or 0),
            misses=int(misses or 0),
            evictions=int(info.get("evicted_keys", 0)),
            entries=entries,
            bytes=size,
        )

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless Redis answers (a start-up probe)."""
        with self._failures("ping"):
            await self.client.ping()

    async def load_scripts(self) -> None:
        """SCRIPT LOAD the Lua scripts now, at start-up, so the first Get or Set runs
        EVALSHA once instead of failing with NOSCRIPT, loading and retrying (an error
        span in the first request's trace). Raises ``Unavailable`` like any operation."""
        with self._failures("load_scripts"):
            for script in (self._get, self._set, self._invalidate):
                await self.client.script_load(script.script)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _scan_entries(self) -> tuple[int, int]:
        """(entries, value bytes) under the prefix; SCAN may repeat keys, so dedupe."""
        seen: set[bytes] = set()
        size, cursor = 0, 0
        while True:
            cursor, batch = await self.client.scan(
                cursor, match=self._entry_pattern, count=_SCAN_COUNT
            )
            fresh = [k for k in batch if k not in seen]
            if fresh:
                seen.update(fresh)
                pipe = self.client.pipeline(transaction=False)
                for key in fresh:
                    pipe.hstrlen(key, "v")
                size += sum(int(n) for n in await pipe.execute())
            if cursor == 0:
                return len(seen), size

    @contextmanager
    def _failures(self, operation: str) -> Iterator[None]:
        """Redis errors -> ``Unavailable``; log when Redis goes away and when it is back."""
        try:
            yield
        except (RedisError, OSError) as error:  # OSError: a socket error redis-py let through
            if self._healthy:
                self._healthy = False
                log.warning("redis unavailable", operation=operation, error=type(error).__name__)
            raise Unavailable(
                f"cache backend (redis) failed in {operation}: {type(error).__name__}: {error}",
                reason=BACKEND_UNAVAILABLE,
                metadata={"backend": self.backend, "operation": operation},
            ) from error
        if not self._healthy:
            self._healthy = True
            log.info("redis available again", operation=operation)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
