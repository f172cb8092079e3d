"""Adds up the model usage of a run's planning and joining calls."""

from __future__ import annotations

from trellis.common.v1 import common_pb2


class UsageTotals:
    def __init__(self, model: str = "") -> None:
        self._total = common_pb2.Usage(model=model)

    def add(self, usage: common_pb2.Usage) -> None:
        if usage.model:
            self._total.model = usage.model
        self._total.input_tokens += usage.input_tokens
        self._total.output_tokens += usage.output_tokens
        self._total.cached_input_tokens += usage.cached_input_tokens
        self._total.cost_nano_usd += usage.cost_nano_usd

    @property
    def cost_nano_usd(self) -> int:
        return self._total.cost_nano_usd

    def total(self) -> common_pb2.Usage:
        total = common_pb2.Usage()
        total.CopyFrom(self._total)
        return total
