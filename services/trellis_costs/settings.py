"""Settings of the cost-accounting service (TRELLIS_* variables).

The prices file is parsed here, at start-up, so a bad one stops the service with a
one-line message instead of surfacing as wrong costs later.
"""

from pydantic import Field, FilePath, field_validator

from trellis.runtime.database import validate_database_url
from trellis.runtime.settings import ServiceSettings
from trellis.runtime.sqlite import DEFAULT_DATABASE_URL
from trellis_costs.budgets import DEFAULT_RESERVATION_SECONDS
from trellis_costs.prices import load_prices_file


class CostsSettings(ServiceSettings):
    port: int = Field(50055, ge=0, le=65535)
    metrics_port: int = Field(9105, ge=0, le=65535)
    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="Ledger, budgets and budget holds: sqlite:///path or"
        " postgresql://user@host/db (replicas share one PostgreSQL).",
    )
    prices_file: FilePath | None = Field(
        None, description="LiteLLM-format prices whose entries override the bundled ones."
    )
    budget_reservation_seconds: float = Field(
        DEFAULT_RESERVATION_SECONDS,
        gt=0,
        description="An allowed CheckBudget with a reservation_id holds its estimate until"
        " the matching RecordUsage, or this long.",
    )
    metrics_tenant_label: bool = Field(
        False,
        description="Fill the tenant label of trellis_cost_usd_total and"
        " trellis_tokens_total (empty otherwise: tenants are unbounded).",
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str) -> str:
        return validate_database_url(url)

    @field_validator("prices_file")
    @classmethod
    def _prices_file(cls, path: FilePath | None) -> FilePath | None:
        if path is not None:
            load_prices_file(path)
        return path
