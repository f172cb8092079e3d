"""Prices: LiteLLM-format parsing, exact integer nano-USD costing, unknown models."""

import json
import math
from decimal import Decimal
from pathlib import Path

import pytest

from trellis_costs.prices import (
    PriceTable,
    load_bundled_prices,
    load_prices_file,
    nano_usd,
    parse_prices,
)


def test_bundled_prices_include_common_models_and_skip_comments() -> None:
    prices = load_bundled_prices()
    for model in (
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "o3-mini",
        "claude-3-5-sonnet-20241022",
        "claude-3-5-haiku-20241022",
        "trellis-offline-rules-v1",
    ):
        assert model in prices, model
    assert not any(name.startswith(("_", "sample_spec")) for name in prices)
    assert prices["gpt-4o"].input_per_token == Decimal("0.0000025")
    assert prices["gpt-4o"].output_per_token == Decimal("0.00001")
    assert prices["claude-3-5-sonnet-20241022"].provider == "anthropic"


def test_offline_model_is_priced_like_gpt_4o_mini() -> None:
    prices = load_bundled_prices()
    offline, mini = prices["trellis-offline-rules-v1"], prices["gpt-4o-mini"]
    assert offline.input_per_token == mini.input_per_token == Decimal("0.00000015")
    assert offline.output_per_token == mini.output_per_token == Decimal("0.0000006")


def test_cost_is_exact_where_float_truncation_is_not() -> None:
    table = PriceTable.load()
    # 100 tokens at 0.15 USD/1M is exactly 15,000 nano-USD; in floats it is 14999.99...
    assert int(100 * 1.5e-07 * 1e9) == 14_999
    assert table.cost_nano_usd("gpt-4o-mini", 100, 0, 0) == (15_000, True)
    # 1,234,567 in x 2,500 + 89,012 out x 10,000 nano-USD per token.
    assert table.cost_nano_usd("gpt-4o", 1_234_567, 89_012, 0) == (3_976_537_500, True)


def test_half_nano_rounds_up_where_float_rounds_down() -> None:
    # 0.35 nano-USD per token: 50 tokens cost exactly 17.5 nano-USD.
    table = PriceTable(parse_prices({"m": {"input_cost_per_token": 3.5e-10}}))
    as_float = 50 * 3.5e-10 * 1e9
    assert math.floor(as_float + 0.5) == 17 and round(as_float) == 17  # float gets it wrong
    assert table.cost_nano_usd("m", 50, 0, 0) == (18, True)
    # Half-up, not banker's rounding: 16.5 nano-USD is 17, not 16.
    even = PriceTable(parse_prices({"m": {"input_cost_per_token": 3.3e-10}}))
    assert even.cost_nano_usd("m", 50, 0, 0) == (17, True)


def test_cached_tokens_are_part_of_input_and_charged_at_cache_read_price() -> None:
    table = PriceTable.load()
    # gpt-4o: 2,500 nano/token input, 1,250 cached, 10,000 output.
    cost, known = table.cost_nano_usd("gpt-4o", 1_000, 10, cached_input_tokens=400)
    assert known
    assert cost == 600 * 2_500 + 400 * 1_250 + 10 * 10_000


def test_cached_price_falls_back_to_input_price() -> None:
    prices = parse_prices({"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}})
    assert prices["m"].cached_input_per_token == Decimal("0.000001")
    assert nano_usd(prices["m"], 10, 1, cached_input_tokens=10) == 10 * 1_000 + 2_000


def test_unknown_model_costs_zero_and_is_reported_unknown() -> None:
    table = PriceTable.load()
    assert table.cost_nano_usd("no-such-model", 1_000_000, 1_000_000, 0) == (0, False)
    assert "no-such-model" not in table


def test_provider_prefixed_name_falls_back_to_bare_model() -> None:
    table = PriceTable.load()
    assert table.cost_nano_usd("openai/gpt-4o", 1, 0, 0) == (2_500, True)


def test_nano_usd_rejects_impossible_token_counts() -> None:
    price = load_bundled_prices()["gpt-4o"]
    with pytest.raises(ValueError):
        nano_usd(price, -1, 0)
    with pytest.raises(ValueError):
        nano_usd(price, 5, 0, cached_input_tokens=6)


def test_parse_skips_entries_without_token_prices() -> None:
    prices = parse_prices(
        {
            "_comment": "ignored",
            "sample_spec": {"input_cost_per_token": 0.0},
            "sample_spec_2": {"input_cost_per_token": 0.0},
            "dall-e-3": {"output_cost_per_pixel": 0.0, "mode": "image_generation"},
            "_private": {"input_cost_per_token": 1.0},
            "ok": {"output_cost_per_token": 1e-06},
        }
    )
    assert list(prices) == ["ok"]
    assert prices["ok"].input_per_token == 0


@pytest.mark.parametrize(
    "entry",
    [
        {"input_cost_per_token": "cheap"},
        {"input_cost_per_token": -1e-06},
        {"output_cost_per_token": True},
    ],
)
def test_parse_rejects_bad_prices_naming_the_model(entry: dict) -> None:
    with pytest.raises(ValueError, match="bad-model"):
        parse_prices({"bad-model": entry})


def test_override_file_replaces_and_adds_models(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "gpt-4o": {"input_cost_per_token": 1e-06, "output_cost_per_token": 0},
                "in-house-llm": {"input_cost_per_token": 2e-09, "output_cost_per_token": 4e-09},
            }
        )
    )
    table = PriceTable.load(path)
    assert table.cost_nano_usd("gpt-4o", 1, 0, 0) == (1_000, True)
    assert table.cost_nano_usd("in-house-llm", 10, 10, 0) == (60, True)
    assert table.cost_nano_usd("gpt-4o-mini", 1, 0, 0) == (150, True)  # bundled still there


def test_bad_override_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json"):
        load_prices_file(path)
    with pytest.raises(ValueError, match=r"missing\.json"):
        load_prices_file(tmp_path / "missing.json")
