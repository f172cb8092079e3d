"""Settings of the executor (TRELLIS_* variables)."""

import socket
from decimal import Decimal
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from trellis.clients.budget_check import BudgetCheckSettings
from trellis.runtime.auth import ApiKeys, KeyConfigError, parse_key_map, read_keys_file
from trellis.runtime.database import validate_database_url
from trellis.runtime.settings import ConfigError, ServiceSettings
from trellis.runtime.sqlite import DEFAULT_DATABASE_URL
from trellis.runtime.validation import DEFAULT_MAX_GOAL_BYTES


class ExecutorSettings(ServiceSettings, BudgetCheckSettings):
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)
    database_url: str = Field(
        DEFAULT_DATABASE_URL, description="Run store: sqlite:///path or postgresql://user@host/db."
    )
    max_parallel: int = Field(
        16, ge=1, le=1024, description="Default tool calls in flight per run."
    )
    max_parallel_process: int = Field(256, ge=1, description="Tool calls in flight per process.")
    max_active_runs: int = Field(
        64,
        ge=1,
        description="Runs executing at once in this replica; a new Run beyond it is refused"
        " at once with RESOURCE_EXHAUSTED (RUN_CAPACITY) and a RetryInfo.",
    )
    max_nodes: int = Field(50, ge=1, le=10_000, description="Default and ceiling of plan size.")
    max_goal_bytes: int = Field(
        DEFAULT_MAX_GOAL_BYTES,
        ge=1,
        description="Largest goal (UTF-8 bytes) a Run may carry; a larger one is refused"
        " INVALID_ARGUMENT (GOAL_TOO_LARGE) before anything is stored or run.",
    )
    max_replans: int = Field(1, ge=0, le=10, description="Default replanning rounds.")
    run_timeout_seconds: float = Field(300.0, gt=0, description="Default bound of a whole run.")
    max_run_cost_usd: Decimal = Field(
        Decimal(0),
        ge=0,
        max_digits=18,
        decimal_places=9,
        description="Default and ceiling of what one run may cost (model and tool calls, USD,"
        " e.g. 0.50); a run over it stops FAILED with RUN_COST_EXCEEDED. 0 = no limit.",
    )
    tools_cache_seconds: float = Field(
        0.0,
        ge=0,
        description="How long a tenant's tool catalog is used without asking the gateway; 0:"
        " checked at every run (a ListTools that only says 'unchanged' while the catalog"
        " version holds). A gateway answer with another catalog version refreshes it at once.",
    )
    gateway_retry_seconds: float = Field(
        20.0,
        ge=0,
        description="How long a node whose tool gateway cannot be reached (UNAVAILABLE) is"
        " dispatched again, with backoff, before it fails (within the run's deadline).",
    )
    instance_id: str = Field(
        "",
        description="Owner name of this replica's runs (empty = host name); replicas sharing"
        " a database need distinct ones, and a restart with the same one resumes its runs.",
    )
    lease_seconds: float = Field(
        15.0,
        ge=0.5,
        description="A run whose owner has not renewed its lease for this long is taken"
        " over by another replica; leases are renewed every third of it.",
    )
    session_context_tokens: int = Field(
        2000,
        ge=100,
        description="Budget (estimated tokens) of a session's earlier turns in a turn's"
        " prompts; over it the oldest turns are folded into a summary by the model.",
    )
    session_ttl: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="Seconds of inactivity after which a session expires: Get/Delete say"
        " NOT_FOUND, and its next turn starts it afresh without the old turns.",
    )
    session_max_turns: int = Field(
        200,
        ge=1,
        description="Most turns of one session; the next Run is FAILED_PRECONDITION SESSION_FULL.",
    )
    auth: bool = Field(
        True,
        description="Every ExecutorService call needs an API key (metadata `authorization:"
        " Bearer <key>`) and acts for the key's tenant; a client's x-tenant-id is ignored."
        " false: the caller's x-tenant-id is trusted (the embedded demo turns it off).",
    )
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        {},
        description='API keys by SHA-256, JSON: {"<sha256 hex of the key>": "<tenant>"}'
        " (`trellis keys new --tenant T` makes a key and its hash).",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of `<sha256 hex> <tenant>` lines (# comments), read at start-up,"
        " in addition to TRELLIS_API_KEYS.",
    )

    @property
    def max_run_cost_nano_usd(self) -> int:
        """``max_run_cost_usd`` in nano-USD (money is an integer everywhere else)."""
        return int(self.max_run_cost_usd * 1_000_000_000)

    @property
    def owner(self) -> str:
        return self.instance_id or socket.gethostname()

    @field_validator("database_url")
    @classmethod
    def _supported_url(cls, value: str) -> str:
        return validate_database_url(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _key_hashes(cls, value: object) -> dict[str, str]:
        return parse_key_map(value)

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file(cls, path: Path | None) -> Path | None:
        if path is not None:
            read_keys_file(path)
        return path

    def key_store(self) -> ApiKeys | None:
        """The keys calls are checked against; None with auth off. Auth on without a
        key, or keys that contradict each other, is a ``ConfigError``."""
        if not self.auth:
            return None
        try:
            keys = ApiKeys.load(self.api_keys, self.api_keys_file)
        except KeyConfigError as error:
            raise ConfigError(str(error)) from None
        if not keys:
            raise ConfigError(
                "TRELLIS_AUTH is on (the default) but no API key is configured: set"
                " TRELLIS_API_KEYS or TRELLIS_API_KEYS_FILE (`trellis keys new --tenant T`"
                " makes one), or TRELLIS_AUTH=false to trust callers' x-tenant-id"
            )
        return keys
