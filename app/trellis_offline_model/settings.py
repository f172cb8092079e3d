"""Settings of the offline model server (TRELLIS_OFFLINE_MODEL_* variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8400


class OfflineModelSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRELLIS_OFFLINE_MODEL_", extra="ignore", frozen=True
    )

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    delay_ms: float = Field(
        0, ge=0, le=60_000, description="Pause before each streamed piece, to mimic a real model."
    )
    line_delay_ms: float = Field(
        0,
        ge=0,
        le=60_000,
        description="Time each line of a plan takes to stream (one node per line).",
    )
