"""Model prices and exact costing in integer nano-USD.

Prices come in LiteLLM's ``model_prices_and_context_window.json`` format (USD per
token), so the file LiteLLM maintains can be dropped in as it is. Money never goes
through a float: prices are parsed as ``Decimal`` and a cost is rounded half-up to a
whole nano-dollar once, at the end. An unknown model costs 0 and says so; costing
must never fail a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

NANO_PER_USD = Decimal(10**9)
BUNDLED_RESOURCE = "prices.json"

_INPUT = "input_cost_per_token"
_OUTPUT = "output_cost_per_token"
_CACHE_READ = "cache_read_input_token_cost"
_IGNORED_PREFIXES = ("_", "sample_spec")


@dataclass(frozen=True)
class Price:
    """USD per token of one model."""

    input_per_token: Decimal
    output_per_token: Decimal
    cached_input_per_token: Decimal
    provider: str = ""
    mode: str = ""


def _usd(model: str, field: str, value: Any) -> Decimal:
    # str() first: a float parsed from JSON keeps the digits written in the file.
    if isinstance(value, bool):
        raise ValueError(f"{model}.{field}: not a number: {value!r}")
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{model}.{field}: not a number: {value!r}") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"{model}.{field}: must be a finite price >= 0, got {value!r}")
    return price


def parse_prices(raw: Mapping[str, Any]) -> dict[str, Price]:
    """The priced models of a LiteLLM-format mapping.

    Comment keys (``_...``), LiteLLM's ``sample_spec`` and entries without a
    per-token price (image or per-second models) are skipped, not errors.
    """
    prices: dict[str, Price] = {}
    for model, entry in raw.items():
        if model.startswith(_IGNORED_PREFIXES) or not isinstance(entry, Mapping):
            continue
        if _INPUT not in entry and _OUTPUT not in entry:
            continue
        input_price = _usd(model, _INPUT, entry.get(_INPUT, 0))
        cached = entry.get(_CACHE_READ)
        cached_price = input_price if cached is None else _usd(model, _CACHE_READ, cached)
        prices[model] = Price(
            input_per_token=input_price,
            output_per_token=_usd(model, _OUTPUT, entry.get(_OUTPUT, 0)),
            cached_input_per_token=cached_price,
            provider=str(entry.get("litellm_provider", "")),
            mode=str(entry.get("mode", "")),
        )
    return prices


def _parse_text(text: str, source: str) -> dict[str, Price]:
    try:
        raw = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object of model -> prices")
    try:
        return parse_prices(raw)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def load_bundled_prices() -> dict[str, Price]:
    """The prices shipped inside the package."""
    text = resources.files(__package__).joinpath(BUNDLED_RESOURCE).read_text(encoding="utf-8")
    return _parse_text(text, BUNDLED_RESOURCE)


def load_prices_file(path: Path) -> dict[str, Price]:
    """Prices from a LiteLLM-format file; ValueError naming the file when it is bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror or error}") from None
    return _parse_text(text, str(path))


def nano_usd(
    price: Price, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
) -> int:
    """Exact cost of one call, rounded half-up to whole nano-USD.

    ``cached_input_tokens`` are part of ``input_tokens`` (OpenAI's usage shape), so
    only the uncached rest pays the full input price.
    """
    if min(input_tokens, output_tokens, cached_input_tokens) < 0:
        raise ValueError("token counts must not be negative")
    if cached_input_tokens > input_tokens:
        raise ValueError("cached_input_tokens must not exceed input_tokens")
    usd = (
        (input_tokens - cached_input_tokens) * price.input_per_token
        + cached_input_tokens * price.cached_input_per_token
        + output_tokens * price.output_per_token
    )
    return int((usd * NANO_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP))


class PriceTable:
    """Prices by model name; the one place a model's cost is computed."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """Bundled prices, with ``override``'s entries replacing or adding models."""
        prices = load_bundled_prices()
        if override is not None:
            prices.update(load_prices_file(override))
        return cls(prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.get(model) is not None

    def get(self, model: str) -> Price | None:
        """The price of ``model``; ``provider/model`` falls back to ``model``."""
        price = self._prices.get(model)
        if price is None and "/" in model:
            price = self._prices.get(model.split("/", 1)[1])
        return price

    def cost_nano_usd(
        self, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> tuple[int, bool]:
        """(cost, known): an unknown model costs 0 with ``known`` False."""
        price = self.get(model)
        if price is None:
            return 0, False
        return nano_usd(price, input_tokens, output_tokens, cached_input_tokens), True
