"""CostsSettings: defaults, TRELLIS_* variables, fail-fast validation."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from trellis.runtime.sqlite import DEFAULT_DATABASE_URL
from trellis_costs.settings import CostsSettings


def test_defaults() -> None:
    s = CostsSettings()
    assert (s.port, s.metrics_port, s.database_url, s.prices_file) == (
        50055,
        9105,
        DEFAULT_DATABASE_URL,
        None,
    )


def test_environment_sets_database_and_prices(monkeypatch, tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"m": {"input_cost_per_token": 1e-06}}')
    monkeypatch.setenv("TRELLIS_DATABASE_URL", "sqlite:///:memory:")
    monkeypatch.setenv("TRELLIS_PRICES_FILE", str(prices))
    s = CostsSettings()
    assert (s.database_url, s.prices_file) == ("sqlite:///:memory:", prices)


def test_non_sqlite_database_url_is_rejected() -> None:
    with pytest.raises(ValidationError, match="sqlite"):
        CostsSettings(database_url="postgresql://db/trellis")


def test_missing_or_broken_prices_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        CostsSettings(prices_file=tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"m": {"input_cost_per_token": "free"}}')
    with pytest.raises(ValidationError, match="input_cost_per_token"):
        CostsSettings(prices_file=broken)
