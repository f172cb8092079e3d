"""CacheService over real gRPC: round trip, TTL, invalidation, stats, bad input."""

import pytest

from trellis.clients.cache import CacheClient
from trellis.runtime.errors import InvalidArgument
from trellis_cache.service import NAME, build
from trellis_cache.settings import CacheSettings


@pytest.fixture
async def cache(serve, channels) -> CacheClient:
    server = await serve(NAME, build, CacheSettings(port=0, metrics_port=0))
    return CacheClient(channels.get(server.target))


async def test_set_get_invalidate_stats(cache: CacheClient) -> None:
    assert await cache.get("k") is None
    await cache.set("k", b"value", ttl=60, tags=["t"])
    assert await cache.get("k") == b"value"
    assert await cache.invalidate(tags=["t"]) == 1
    assert await cache.get("k") is None
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.backend) == (1, 2, 0, "memory")


async def test_empty_key_is_invalid_argument_with_field_violation(cache: CacheClient) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await cache.get("")
    assert raised.value.reason == "KEY_REQUIRED"
    assert [v.field for v in raised.value.violations] == ["key"]
