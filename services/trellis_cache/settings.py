"""Settings of the cache service (TRELLIS_* variables)."""

from pydantic import Field, field_validator

from trellis.runtime.settings import ServiceSettings, validate_redis_url


class CacheSettings(ServiceSettings):
    port: int = Field(50054, ge=0, le=65535)
    metrics_port: int = Field(9104, ge=0, le=65535)
    cache_max_entries: int = Field(10_000, ge=1, description="LRU bound on entries.")
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="LRU bound on bytes.")
    cache_default_ttl_seconds: float = Field(300.0, gt=0, description="TTL when Set gives none.")
    redis_url: str = Field(
        "",
        description="Redis for the cache (redis://, rediss://, unix://); empty: in-memory LRU.",
    )
    cache_redis_prefix: str = Field(
        "trellis:cache:", min_length=1, description="Namespace of the cache's keys in Redis."
    )
    cache_redis_timeout_seconds: float = Field(
        0.25,
        gt=0,
        le=30,
        description="Redis socket/connect timeout; a dead Redis fails a call within ~2x this.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        return validate_redis_url(value)
