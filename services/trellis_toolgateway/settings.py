"""Settings of the tool-gateway service (TRELLIS_* variables)."""

from pydantic import Field

from trellis.runtime.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9103, ge=0, le=65535)
    command_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="run_command: a command still running after this is killed."
    )
    command_max_output_bytes: int = Field(
        64 * 1024, ge=1, le=16 * 1024 * 1024, description="run_command: stdout/stderr cut here."
    )
    cache_timeout_seconds: float = Field(
        1.0, gt=0, description="Bound of one cache Get/Set; the cache is fail-open beyond it."
    )
