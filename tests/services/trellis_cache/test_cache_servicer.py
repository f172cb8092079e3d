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


async def test_invalidate_by_tag_group_over_grpc(cache: CacheClient) -> None:
    await cache.set("a", b"1", ttl=60, tags=["tool:r", "tenant:acme"])
    await cache.set("b", b"2", ttl=60, tags=["tool:r", "tenant:beta"])
    assert await cache.invalidate(groups=[["tool:r", "tenant:acme"]]) == 1
    assert (await cache.get("a"), await cache.get("b")) == (None, b"2")


async def test_entry_carries_its_remaining_ttl(cache: CacheClient) -> None:
    await cache.set("k", b"v", ttl=60)
    found = await cache.entry("k")
    assert found is not None and found[0] == b"v" and 59 < found[1] <= 60
    assert await cache.entry("missing") is None


async def test_empty_or_bad_tag_group_is_refused(cache: CacheClient) -> None:
    await cache.set("k", b"v", ttl=60, tags=["t"])
    with pytest.raises(InvalidArgument) as raised:
        await cache.invalidate(groups=[["t"], []])
    assert raised.value.reason == "TAG_GROUP_EMPTY"
    assert [v.field for v in raised.value.violations] == ["groups[1].tags"]
    with pytest.raises(InvalidArgument) as raised:
        await cache.invalidate(groups=[["t", "has space"]])
    assert raised.value.reason == "INVALID_ID"
    assert [v.field for v in raised.value.violations] == ["groups[0].tags[1]"]
    assert await cache.get("k") == b"v"  # nothing went
