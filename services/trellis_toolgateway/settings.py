"""Settings of the tool-gateway service (TRELLIS_* variables).

The tools file is checked here, with the other settings, so a bad file stops the
service at start-up with one line naming the file and the place inside it (exit 2),
exactly like a bad variable. Later edits are checked by the reloader instead, which
keeps the last good registry rather than stopping anything.

``TRELLIS_REDIS_URL`` moves the idempotency keys of side-effecting tools to Redis
(``trellis_toolgateway.redis_idempotency``), so replicas and restarts share them.

``TRELLIS_OUTBOX_PATH`` is the SQLite file keeping tool usage cost accounting could not
take yet (``trellis.clients.usage_outbox``); one per process, on a volume that outlives it.
"""

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from trellis.clients.usage_outbox import default_outbox_path, validate_outbox_path
from trellis.runtime.settings import ServiceSettings, validate_redis_url
from trellis_toolgateway.tenancy import parse_tenant_list, parse_tenant_tools


class GatewaySettings(ServiceSettings):
    port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9103, ge=0, le=65535)
    tools_file: Path | None = Field(
        None,
        validate_default=True,
        description="YAML file declaring the tools; unset = the bundled tools.yaml (builtins).",
    )
    tools_reload_seconds: float = Field(
        2.0, ge=0, description="How often the tools file is checked for changes; 0 = never."
    )
    command_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Command tools: a command still running after this is killed (default).",
    )
    command_max_output_bytes: int = Field(
        64 * 1024,
        ge=1,
        le=16 * 1024 * 1024,
        description="Command tools: stdout/stderr cut here (default).",
    )
    tool_max_result_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest output (serialized bytes) a tool call may return; more fails the"
        " node with OUTPUT_TOO_LARGE. A tool's max_result_bytes overrides it; both stay under"
        " TRELLIS_MAX_MESSAGE_BYTES.",
    )
    tool_source_list_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="How long a load (start-up, reload) waits for a tool source's (MCP server,"
        " tool server) first answer; a slower source's tools join the catalog when it answers,"
        " without a reload.",
    )
    tool_source_connect_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Longest an MCP server may take to start and answer initialize (a cold"
        " npx -y or uvx downloads first); past it, it is tried again with backoff.",
    )
    tool_source_retry_max_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Largest delay between attempts to list a tool source that does not answer"
        " (exponential backoff with jitter from 1 s).",
    )
    cache_timeout_seconds: float = Field(
        1.0, gt=0, description="Bound of one cache Get/Set; the cache is fail-open beyond it."
    )
    breaker_consecutive_failures: int = Field(
        5, ge=1, description="A tool's circuit opens after this many failures in a row."
    )
    breaker_failure_rate: float = Field(
        0.5, gt=0, le=1, description="... or when this share of its last 20 calls failed."
    )
    breaker_cooldown_seconds: float = Field(
        30.0, gt=0, description="An open circuit lets one probe call through after this."
    )
    tool_queue_per_slot: int = Field(
        4, ge=0, description="Calls waiting per max_concurrency slot before TOOL_BUSY."
    )

    redis_url: str = Field(
        "",
        description="Redis keeping side-effecting calls' idempotency keys and first outcomes,"
        " shared by gateway replicas and kept across restarts (redis://, rediss://, unix://);"
        " empty: in-process (one replica; a restart forgets them).",
    )
    idempotency_lease_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="A running side-effecting call holds its key this long, renewed every"
        " third of it; after a gateway died mid-call, retries with the key wait this long,"
        " then fail IDEMPOTENCY_UNKNOWN (never run twice).",
    )
    idempotency_ttl_seconds: float = Field(
        24 * 3600.0,
        gt=0,
        description="How long a side-effecting call's first outcome answers retries with its key.",
    )
    idempotency_redis_prefix: str = Field(
        "trellis:idem:", min_length=1, description="Namespace of the idempotency keys in Redis."
    )
    idempotency_redis_timeout_seconds: float = Field(
        0.5,
        gt=0,
        le=30,
        description="Redis socket/connect timeout of the idempotency store; with Redis down,"
        " side-effecting calls fail UNAVAILABLE within ~2x this.",
    )

    outbox_path: Path = Field(
        default_outbox_path("toolgateway"),
        description="SQLite file keeping tool usage until cost accounting takes it "
        "(one per gateway process).",
    )
    usage_batch_seconds: float = Field(
        0.02,
        ge=0,
        le=1,
        description="How long tool usage waits to be sent with the usage of other calls"
        " (one RecordUsages per batch): off the path of the executor's next dispatch."
        " 0: as soon as no batch is under way.",
    )
    usage_free_batch_seconds: float = Field(
        1.0,
        ge=0,
        le=10,
        description="How long the usage of a tool call that cost nothing (tool cost 0, no"
        " tokens) may wait to go with other usage; it spends no budget. A gateway killed"
        " (not stopped) loses at most this long of such rows from the ledger.",
    )

    tenant_tools: Annotated[dict[str, list[str]], NoDecode] = Field(
        {},
        description='Tools each tenant may use, JSON: {"acme": ["arithmetic", "files_*"],'
        ' "*": ["echo"]} ("*" key: tenants not listed; absent: they may use all tools).'
        " Other calls: PERMISSION_DENIED (TOOL_NOT_ALLOWED); ListTools shows only these.",
    )

    cache_admin_tenants: Annotated[list[str], NoDecode] = Field(
        [],
        description="Tenants whose InvalidateCache (`trellis cache invalidate`) may drop"
        " another tenant's or every tenant's cached results (comma-separated or JSON list);"
        " others drop only their own.",
    )

    @field_validator("cache_admin_tenants", mode="before")
    @classmethod
    def _admin_tenants(cls, value: object) -> object:
        return parse_tenant_list(value)

    @field_validator("outbox_path")
    @classmethod
    def _outbox_file(cls, value: Path) -> Path:
        return validate_outbox_path(value)

    @field_validator("tenant_tools", mode="before")
    @classmethod
    def _tenant_tools(cls, value: object) -> dict[str, list[str]]:
        return parse_tenant_tools(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        return validate_redis_url(value)

    @field_validator("tools_file")
    @classmethod
    def _tools_file_loads(cls, path: Path | None) -> Path | None:
        # Imported here: the tool implementations are not needed to read other settings.
        from trellis_toolgateway.loader import BUNDLED_TOOLS_FILE, ToolsFileError, check_tools_file

        try:
            check_tools_file(path or BUNDLED_TOOLS_FILE)
        except ToolsFileError as error:
            raise ValueError(str(error)) from None
        return path

    @property
    def tools_path(self) -> Path:
        """The tools file in use."""
        return self.tools_file or self._bundled()

    @staticmethod
    def _bundled() -> Path:
        from trellis_toolgateway.loader import BUNDLED_TOOLS_FILE

        return BUNDLED_TOOLS_FILE
