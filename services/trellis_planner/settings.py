"""Settings of the planner (TRELLIS_* variables, plus the openai client's own two).

``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` keep their standard, unprefixed names so any
OpenAI-compatible endpoint is configured the way its docs say. The defaults reach the
offline rules model on its default port, so a fresh checkout plans with no network.

Model access: ``TRELLIS_FALLBACK_MODELS`` is a comma-separated list (or a JSON list);
``TRELLIS_MODEL_RPM``/``TRELLIS_MODEL_TPM`` limit every model (0 = unlimited) and
``TRELLIS_MODEL_RATE_LIMITS`` overrides them per model as JSON, e.g.
``{"gpt-4o": {"rpm": 500, "tpm": 30000}}`` (a missing key keeps the default).
``TRELLIS_REDIS_URL`` shares the limits between replicas; empty keeps them per process.
Plan format (README "Using a real model"): ``TRELLIS_PLAN_FORMAT`` (``auto``, ``jsonl``,
``json_schema``, ``tool_calls``) and, for ``auto``, ``TRELLIS_MODEL_PLAN_FORMATS`` as JSON
``{"<model or fnmatch pattern>": "<format>"}`` (``formats.py``). Model breakers:
``TRELLIS_MODEL_BREAKER_FAILURES`` failures in a row open a model's breaker for
``TRELLIS_MODEL_BREAKER_COOLDOWN_SECONDS`` (``breaker.py``; 0 failures: off).
``TRELLIS_OUTBOX_PATH`` is the SQLite file keeping usage events cost accounting could
not take yet (``trellis.clients.usage_outbox``); one per process, on a volume that outlives it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from trellis.clients.budget_check import BudgetCheckSettings
from trellis.clients.usage_outbox import default_outbox_path, validate_outbox_path
from trellis.runtime.settings import ServiceSettings, validate_redis_url
from trellis.runtime.validation import DEFAULT_MAX_GOAL_BYTES
from trellis_planner.formats import PlanFormat

OFFLINE_MODEL = "trellis-offline-rules-v1"
OFFLINE_EMBEDDING_MODEL = "trellis-offline-embed-v1"
OFFLINE_BASE_URL = "http://127.0.0.1:8400/v1"


class ModelRateLimit(BaseModel):
    """One model's limits; None keeps TRELLIS_MODEL_RPM / TRELLIS_MODEL_TPM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(None, ge=0, description="Requests per minute; 0 = unlimited.")
    tpm: int | None = Field(None, ge=0, description="Tokens per minute; 0 = unlimited.")


class PlannerSettings(ServiceSettings, BudgetCheckSettings):
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
    embedding_model: str = Field(
        OFFLINE_EMBEDDING_MODEL,
        min_length=1,
        description="Embedding model of embed tools that name none (Embed).",
    )
    model_timeout_seconds: float = Field(60.0, gt=0, description="Upper bound of one model call.")
    max_nodes: int = Field(50, ge=1, le=1000, description="Plan size when a request gives none.")
    max_plan_line_bytes: int = Field(
        65536,
        ge=1,
        description="Longest line (UTF-8 bytes) of a model's plan, one node per line: a longer "
        "line ends planning with INVALID_PLAN as soon as it grows past this, read no further.",
    )
    max_goal_bytes: int = Field(
        DEFAULT_MAX_GOAL_BYTES,
        ge=1,
        description="Largest goal (UTF-8 bytes) a Plan or Join request may carry (keep it"
        " the executor's); a larger one is INVALID_ARGUMENT (GOAL_TOO_LARGE).",
    )
    model_max_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of one model call on 429, 5xx and connection errors "
        "(Retry-After honoured), within its timeout.",
    )
    fallback_models: Annotated[list[str], NoDecode] = Field(
        [],
        description="Models tried in order when the model is still rate limited, "
        "unavailable or timing out before it answered (comma-separated or JSON list).",
    )
    model_rpm: int = Field(0, ge=0, description="Requests per minute per model; 0 = unlimited.")
    model_tpm: int = Field(
        0,
        ge=0,
        description="Tokens per minute per model (estimated input + expected output); "
        "0 = unlimited.",
    )
    model_rate_limits: dict[str, ModelRateLimit] = Field(
        {},
        description='Per-model overrides, JSON: {"gpt-4o": {"rpm": 500, "tpm": 30000}}.',
    )
    model_expected_output_tokens: int = Field(
        256,
        ge=0,
        description="Output tokens a call is charged against TRELLIS_MODEL_TPM before it runs.",
    )
    redis_url: str = Field(
        "",
        description="Redis sharing the model rate limits and breakers between planner "
        "replicas (redis://, rediss://, unix://); empty: per process.",
    )
    plan_format: Literal["auto", "jsonl", "json_schema", "tool_calls"] = Field(
        "auto",
        description="How the model is asked for plans: jsonl, json_schema (response_format), "
        "tool_calls (function calling), or auto: per model (TRELLIS_MODEL_PLAN_FORMATS, "
        "then the built-in table; unknown models get tool_calls).",
    )
    model_plan_formats: dict[str, PlanFormat] = Field(
        {},
        description='auto\'s table, before the built-in one, JSON: {"my-model": "jsonl", '
        '"llama*": "json_schema"} (exact names first, then fnmatch patterns in order).',
    )
    model_breaker_failures: int = Field(
        3,
        ge=0,
        le=1000,
        description="Failed calls in a row (unavailable, timing out, broken streams) after "
        "which a model is skipped for the next fallback model; 0 = no breaker.",
    )
    model_breaker_cooldown_seconds: float = Field(
        30.0,
        gt=0,
        description="How long an open model breaker skips its model before one call probes it.",
    )

    outbox_path: Path = Field(
        default_outbox_path("planner"),
        description="SQLite file keeping model usage until cost accounting takes it "
        "(one per planner process).",
    )

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("fallback_models", mode="before")
    @classmethod
    def _model_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return []
            if text.startswith("["):
                return json.loads(text)
            return text.split(",")
        return value

    @field_validator("fallback_models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value]
        if any(not name for name in names):
            raise ValueError("model names must not be empty")
        return list(dict.fromkeys(names))

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        return validate_redis_url(value)

    @field_validator("outbox_path")
    @classmethod
    def _outbox_file(cls, value: Path) -> Path:
        return validate_outbox_path(value)
