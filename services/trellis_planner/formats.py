"""Which plan format a run's model gets: ``jsonl``, ``json_schema`` or ``tool_calls``.

``TRELLIS_PLAN_FORMAT`` fixes one for every model, or is ``auto`` (the default): then the
model's name is looked up in ``TRELLIS_MODEL_PLAN_FORMATS`` (the operator's table, JSON
``{"<model or fnmatch pattern>": "<format>"}``), then in ``BUILTIN_MODEL_FORMATS``; a
model neither names gets ``tool_calls``, which every OpenAI-compatible server that
serves tools understands. Within a table an exact name wins over a pattern, and
patterns are tried in the order written.

A run keeps the format its first plan got (the executor sends it back on every later
Plan and Join, a resumed run included), so a conversation started with tool calls is
never continued as JSON Lines, whatever the configuration says meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from fnmatch import fnmatchcase

from trellis.common.v1 import common_pb2


class PlanFormat(StrEnum):
    JSONL = "jsonl"
    JSON_SCHEMA = "json_schema"
    TOOL_CALLS = "tool_calls"

    @property
    def proto(self) -> common_pb2.PlanFormat.ValueType:
        return _TO_PROTO[self]

    @classmethod
    def of(cls, value: common_pb2.PlanFormat.ValueType) -> PlanFormat | None:
        """The format a request carries; None when it is unspecified (or unknown)."""
        return _FROM_PROTO.get(value)


AUTO = "auto"

_TO_PROTO = {
    PlanFormat.JSONL: common_pb2.PLAN_FORMAT_JSONL,
    PlanFormat.JSON_SCHEMA: common_pb2.PLAN_FORMAT_JSON_SCHEMA,
    PlanFormat.TOOL_CALLS: common_pb2.PLAN_FORMAT_TOOL_CALLS,
}
_FROM_PROTO = {proto: name for name, proto in _TO_PROTO.items()}

#: What ``auto`` gives the models Trellis knows (README "Using a real model").
BUILTIN_MODEL_FORMATS: dict[str, PlanFormat] = {
    # The development model speaks all three; JSON Lines shows the streamed DAG best.
    "trellis-offline-rules-*": PlanFormat.JSONL,
    # OpenAI and Azure OpenAI: parallel function calling.
    "gpt-*": PlanFormat.TOOL_CALLS,
    "chatgpt-*": PlanFormat.TOOL_CALLS,
    "o[0-9]*": PlanFormat.TOOL_CALLS,
    # Hugging Face names (vLLM, SGLang, TGI) and Ollama tags: guided decoding follows a
    # JSON Schema for every model, while tool calls need a server-side parser per model.
    "*/*": PlanFormat.JSON_SCHEMA,
    "*:*": PlanFormat.JSON_SCHEMA,
}
DEFAULT_FORMAT = PlanFormat.TOOL_CALLS


def _lookup(model: str, table: Mapping[str, PlanFormat]) -> PlanFormat | None:
    if model in table:
        return table[model]
    return next((fmt for pattern, fmt in table.items() if fnmatchcase(model, pattern)), None)


class FormatChooser:
    """``TRELLIS_PLAN_FORMAT`` and ``TRELLIS_MODEL_PLAN_FORMATS`` applied to a model name."""

    def __init__(
        self, setting: str = AUTO, overrides: Mapping[str, PlanFormat] | None = None
    ) -> None:
        self._fixed = None if setting == AUTO else PlanFormat(setting)
        self._overrides = dict(overrides or {})

    def choose(self, model: str, requested: common_pb2.PlanFormat.ValueType = 0) -> PlanFormat:
        """The run's format if the request carries one, else this planner's choice."""
        if (kept := PlanFormat.of(requested)) is not None:
            return kept
        if self._fixed is not None:
            return self._fixed
        return (
            _lookup(model, self._overrides)
            or _lookup(model, BUILTIN_MODEL_FORMATS)
            or DEFAULT_FORMAT
        )
