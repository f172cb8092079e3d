"""Settings of the cost-accounting service (TRELLIS_* variables).

The prices file is parsed here, at start-up, so a bad one stops the service with a
one-line message instead of surfacing as wrong costs later.
"""

from pydantic import Field, FilePath, field_validator

from trellis.runtime.settings import ServiceSettings
from trellis.runtime.sqlite import DEFAULT_DATABASE_URL, require_sqlite_url
from trellis_costs.prices import load_prices_file


class CostsSettings(ServiceSettings):
    port: int = Field(50055, ge=0, le=65535)
    metrics_port: int = Field(9105, ge=0, le=65535)
    database_url: str = Field(DEFAULT_DATABASE_URL, description="Ledger store (sqlite:///path).")
    prices_file: FilePath | None = Field(
        None, description="LiteLLM-format prices whose entries override the bundled ones."
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str) -> str:
        return require_sqlite_url(url, "cost-accounting")

    @field_validator("prices_file")
    @classmethod
    def _prices_file(cls, path: FilePath | None) -> FilePath | None:
        if path is not None:
            load_prices_file(path)
        return path
