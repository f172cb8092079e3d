"""Settings of the cache service (TRELLIS_* variables)."""

from pydantic import Field

from trellis.runtime.settings import ServiceSettings


class CacheSettings(ServiceSettings):
    port: int = Field(50054, ge=0, le=65535)
    metrics_port: int = Field(9104, ge=0, le=65535)
    cache_max_entries: int = Field(10_000, ge=1, description="LRU bound on entries.")
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="LRU bound on bytes.")
    cache_default_ttl_seconds: float = Field(300.0, gt=0, description="TTL when Set gives none.")
