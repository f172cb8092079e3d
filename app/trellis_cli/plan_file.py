"""``--plan-file``: a JSON list of ToolCall objects, read and checked before any call.

A file that is missing, is not JSON or has the wrong shape is one ``PlanFileError`` line
naming the file and what is wrong with it (``plan.json: plan[1].tool: Field required``);
whether the tools exist and the DAG holds is the executor's to say (INVALID_PLAN).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import to_struct

SHAPE = '[{"node_id": "n1", "tool": "arithmetic", "args": {...}, "depends_on": [...]}, ...]'


class PlanFileError(ValueError):
    """The plan file cannot be used; the message names it and says why, in one line."""


class _Node(BaseModel):
    """One ToolCall as the file writes it (the .proto field names)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    node_id: str
    tool: str
    args: dict[str, Any] | None = None
    depends_on: list[str] = Field(default_factory=list)


_PLAN = TypeAdapter(list[_Node])


_JSON_TYPES = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}


def _where(loc: tuple[int | str, ...]) -> str:
    path = "plan"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _problems(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        got = f" (got {json.dumps(item['input'])[:40]})" if item["type"] != "missing" else ""
        parts.append(f"{_where(item['loc'])}: {item['msg']}{got}")
    return "; ".join(parts)


def read_plan(path: Path) -> list[common_pb2.ToolCall]:
    """The ToolCalls of the plan file at ``path``, or ``PlanFileError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise PlanFileError(f"{path}: cannot read it ({reason})") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise PlanFileError(f"{path}: not JSON ({error}); expected {SHAPE}") from None
    if not isinstance(data, list):
        raise PlanFileError(
            f"{path}: expected a JSON list of ToolCall objects {SHAPE},"
            f" not a JSON {_JSON_TYPES.get(type(data), 'null')}"
        )
    try:
        nodes = _PLAN.validate_python(data)
    except ValidationError as error:
        raise PlanFileError(f"{path}: {_problems(error)}") from None
    return [
        common_pb2.ToolCall(
            node_id=node.node_id,
            tool=node.tool,
            args=to_struct(node.args),
            depends_on=node.depends_on,
        )
        for node in nodes
    ]
