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
    assert s.budget_reservation_seconds == 60.0
    assert s.metrics_tenant_label is False


def test_environment_sets_every_costs_setting(monkeypatch, tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"m": {"input_cost_per_token": 1e-06}}')
    monkeypatch.setenv("TRELLIS_DATABASE_URL", "sqlite:///:memory:")
    monkeypatch.setenv("TRELLIS_PRICES_FILE", str(prices))
    monkeypatch.setenv("TRELLIS_BUDGET_RESERVATION_SECONDS", "2.5")
    monkeypatch.setenv("TRELLIS_METRICS_TENANT_LABEL", "true")
    s = CostsSettings()
    assert (s.database_url, s.prices_file) == ("sqlite:///:memory:", prices)
    assert s.budget_reservation_seconds == 2.5
    assert s.metrics_tenant_label is True


@pytest.mark.parametrize("url", ["postgresql://db/trellis", "postgres://u@db:5432/trellis"])
def test_postgresql_ledger_url_is_accepted(url: str) -> None:
    assert CostsSettings(database_url=url).database_url == url


@pytest.mark.parametrize("url", ["mysql://db/trellis", "sqlite://relative.db", ""])
def test_other_database_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValidationError, match="sqlite:///path or postgresql://"):
        CostsSettings(database_url=url)


@pytest.mark.parametrize("value", [0, -1])
def test_bad_reservation_times_are_rejected(value: float) -> None:
    with pytest.raises(ValidationError, match="budget_reservation_seconds"):
        CostsSettings(budget_reservation_seconds=value)


def test_missing_or_broken_prices_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        CostsSettings(prices_file=tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"m": {"input_cost_per_token": "free"}}')
    with pytest.raises(ValidationError, match="input_cost_per_token"):
        CostsSettings(prices_file=broken)
