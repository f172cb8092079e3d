"""Settings of the planner (TRELLIS_* variables, plus the openai client's own two).

``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` keep their standard, unprefixed names so any
OpenAI-compatible endpoint is configured the way its docs say. The defaults reach the
offline rules model on its default port, so a fresh checkout plans with no network.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from trellis.runtime.settings import ServiceSettings

OFFLINE_MODEL = "trellis-offline-rules-v1"
OFFLINE_BASE_URL = "http://127.0.0.1:8400/v1"


class PlannerSettings(ServiceSettings):
    # Field names stay usable as keyword arguments next to the unprefixed aliases.
    model_config = SettingsConfigDict(validate_by_name=True, validate_by_alias=True)

    port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    model: str = Field(OFFLINE_MODEL, min_length=1, description="Model the planner calls.")
    openai_base_url: str = Field(
        OFFLINE_BASE_URL,
        validation_alias=AliasChoices("OPENAI_BASE_URL"),
        description="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1.",
    )
    openai_api_key: SecretStr = Field(
        SecretStr("not-needed-offline"),
        validation_alias=AliasChoices("OPENAI_API_KEY"),
        description="API key of the endpoint (never logged).",
    )
    model_timeout_seconds: float = Field(60.0, gt=0, description="Upper bound of one model call.")
    max_nodes: int = Field(50, ge=1, le=1000, description="Plan size when a request gives none.")

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")
