"""Settings of the executor (TRELLIS_* variables)."""

import socket

from pydantic import Field, field_validator

from trellis.runtime.database import validate_database_url
from trellis.runtime.settings import ServiceSettings
from trellis.runtime.sqlite import DEFAULT_DATABASE_URL


class ExecutorSettings(ServiceSettings):
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)
    database_url: str = Field(
        DEFAULT_DATABASE_URL, description="Run store: sqlite:///path or postgresql://user@host/db."
    )
    max_parallel: int = Field(
        16, ge=1, le=1024, description="Default tool calls in flight per run."
    )
    max_parallel_process: int = Field(256, ge=1, description="Tool calls in flight per process.")
    max_nodes: int = Field(50, ge=1, le=10_000, description="Default and ceiling of plan size.")
    max_replans: int = Field(1, ge=0, le=10, description="Default replanning rounds.")
    run_timeout_seconds: float = Field(300.0, gt=0, description="Default bound of a whole run.")
    tools_cache_seconds: float = Field(30.0, ge=0, description="How long ListTools is reused.")
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

    @property
    def owner(self) -> str:
        return self.instance_id or socket.gethostname()

    @field_validator("database_url")
    @classmethod
    def _supported_url(cls, value: str) -> str:
        return validate_database_url(value)
