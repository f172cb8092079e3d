"""Typed settings from the environment (pydantic-settings), validated at start-up.

Every service has a ``ServiceSettings`` subclass with its own default ports. A bad
value stops the service with one line naming the variable, via ``load_settings``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trellis.runtime import tls

ENV_PREFIX = "TRELLIS_"

Port = int
LogLevel = Literal["debug", "info", "warning", "error"]
_TARGET = "gRPC target of the {} (host:port; dns:///host:port balances replicas)."


def json_object(value: object, shape: str) -> Mapping[str, Any]:
    """A JSON-object setting (text, or already decoded) as a mapping; empty text is {}.

    ValueError says what was expected (``shape``, e.g. ``{"<tenant>": ["<tool>"]}``), so
    the one-line start-up error names the variable and the format.
    """
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except ValueError as error:
            raise ValueError(f"not JSON ({error.args[0]}); expected {shape}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a JSON object {shape}")
    return value


class ServiceSettings(BaseSettings):
    """Settings every service shares: listening, limits, peers, logging."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in containers).")
    port: Port = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: Port = Field(0, ge=0, le=65535, description="Prometheus /metrics; 0 = off.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest gRPC message."
    )
    max_concurrent_rpcs: int = Field(1000, ge=1, description="Beyond: RESOURCE_EXHAUSTED.")
    max_connection_age_seconds: float = Field(
        300.0,
        ge=0,
        description="Clients are asked to reconnect after this (so new replicas get calls);"
        " streams in flight finish first. 0 = never.",
    )
    grace_seconds: float = Field(5.0, ge=0, description="In-flight RPCs get this long on stop.")
    call_timeout_seconds: float = Field(30.0, gt=0, description="Default onward-call timeout.")
    log_level: LogLevel = Field("info", description="debug, info, warning or error.")

    executor_target: str = Field("localhost:50051", description=_TARGET.format("executor"))
    planner_target: str = Field("localhost:50052", description=_TARGET.format("planner"))
    toolgateway_target: str = Field("localhost:50053", description=_TARGET.format("tool gateway"))
    cache_target: str = Field("localhost:50054", description=_TARGET.format("cache"))
    costs_target: str = Field("localhost:50055", description=_TARGET.format("cost accounting"))

    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate of this service, used as server and as client"
        " (subjectAltNames: every host it is reached by). With TRELLIS_TLS_KEY_FILE and"
        " TRELLIS_TLS_CA_FILE: mTLS on every server and channel; none of the three: plaintext.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of that certificate.")
    tls_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle: servers require client certificates it signed, and"
        " channels trust only servers it signed.",
    )

    @model_validator(mode="after")
    def _tls_all_or_none(self) -> ServiceSettings:
        try:
            tls.from_settings(self)
        except tls.TlsConfigError as error:
            raise ValueError(str(error)) from None
        return self


class StartupError(Exception):
    """Something a setting names cannot be used while a service starts (a busy port, a
    database that refuses the URL): the process stops with one line naming the setting,
    exit code 2, like a bad variable."""


class ConfigError(StartupError, ValueError):
    """A configuration problem found while a service starts, after its variables parsed
    (e.g. auth on without keys): the process stops with one line, exit code 2."""


@contextmanager
def startup_errors_exit(program: str) -> Iterator[None]:
    """Around a service's start: a ``StartupError`` becomes one line on stderr
    (``<program>: ...``; ``invalid configuration:`` for a ``ConfigError``) and exit code 2."""
    try:
        yield
    except StartupError as error:
        kind = "invalid configuration: " if isinstance(error, ConfigError) else ""
        print(f"{program}: {kind}{error}", file=sys.stderr)
        raise SystemExit(2) from None


S = TypeVar("S", bound=BaseSettings)


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def validate_redis_url(value: str) -> str:
    """For ``redis_url`` settings (cache, planner): a Redis URL, or empty for none."""
    value = value.strip()
    if value and not value.startswith(REDIS_SCHEMES):
        raise ValueError(f"must start with {', '.join(REDIS_SCHEMES)} (or be empty)")
    return value


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable a settings field is read from."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable ``cls`` reads (all choices of aliased fields)."""
    names = set()
    for field, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(choice).upper() for choice in alias.choices}
        else:
            names.add(env_name(cls, field))
    return names


def _variable(cls: type[BaseSettings], loc: tuple[int | str, ...]) -> str:
    name = str(loc[0]) if loc else ""
    if name in cls.model_fields:
        return env_name(cls, name)
    return name  # errors of aliased fields are already reported by their variable name


def describe_error(error: ValidationError, cls: type[BaseSettings]) -> str:
    """One line naming every bad variable and why it is bad."""
    parts = []
    for item in error.errors():
        got = f" (got {item['input']!r})" if "input" in item and item["type"] != "missing" else ""
        variable = _variable(cls, item["loc"])
        parts.append(f"{variable}: {item['msg']}{got}" if variable else f"{item['msg']}")
    return "; ".join(parts)


def load_settings(cls: type[S], program: str, **overrides: object) -> S:
    """Build ``cls`` from the environment, or exit 2 with a one-line explanation."""
    try:
        return cls(**overrides)
    except ValidationError as error:
        print(f"{program}: invalid configuration: {describe_error(error, cls)}", file=sys.stderr)
        raise SystemExit(2) from None
