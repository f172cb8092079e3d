"""Cache settings: TRELLIS_REDIS_URL picks the backend and is checked at start-up."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider

from trellis.runtime.settings import load_settings
from trellis.runtime.telemetry import Telemetry
from trellis_cache.redis_store import RedisStore
from trellis_cache.service import make_store
from trellis_cache.settings import CacheSettings
from trellis_cache.store import MemoryStore


@pytest.mark.parametrize(
    "url", ["redis://cache:6379/0", "rediss://:pw@cache:6380/1", "unix:///run/redis.sock"]
)
def test_redis_url_schemes_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("TRELLIS_REDIS_URL", url)
    monkeypatch.setenv("TRELLIS_CACHE_REDIS_PREFIX", "blue:")
    settings = CacheSettings()
    assert (settings.redis_url, settings.cache_redis_prefix) == (url, "blue:")


def test_defaults_are_memory_and_the_trellis_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRELLIS_REDIS_URL", raising=False)
    monkeypatch.delenv("TRELLIS_CACHE_REDIS_PREFIX", raising=False)
    settings = CacheSettings()
    assert (settings.redis_url, settings.cache_redis_prefix) == ("", "trellis:cache:")


@pytest.mark.parametrize("url", ["http://cache:6379", "cache:6379", "localhost"])
def test_other_urls_stop_the_service_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    monkeypatch.setenv("TRELLIS_REDIS_URL", url)
    with pytest.raises(SystemExit) as exited:
        load_settings(CacheSettings, "trellis-cache")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "TRELLIS_REDIS_URL" in err and "redis://" in err


def test_empty_prefix_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLIS_CACHE_REDIS_PREFIX", "")
    with pytest.raises(SystemExit):
        load_settings(CacheSettings, "trellis-cache")


async def test_backend_follows_the_url(redis_server) -> None:
    telemetry = Telemetry("cache", TracerProvider())  # not the process-global provider
    memory = await make_store(CacheSettings(redis_url=""), telemetry)
    redis = await make_store(CacheSettings(redis_url=redis_server.url), telemetry)
    try:
        assert isinstance(memory, MemoryStore)
        assert isinstance(redis, RedisStore) and redis.backend == "redis"
        await redis.set("k", b"v", ttl=60)
        assert await redis.get("k") is not None
    finally:
        await memory.aclose()
        await redis.aclose()
        telemetry.shutdown()
