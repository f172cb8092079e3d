"""A tool ready to be called: the tool and its compiled argument and output validators.

Schemas are checked and compiled once, when a tool enters the catalog (a declared tool at
load, a source's tool when the source is listed), so a bad schema is a load problem
instead of failing calls, and each call only validates.
"""

from __future__ import annotations

from dataclasses import dataclass

from jsonschema import Draft202012Validator

from trellis.runtime.validation import TOOL_NAME
from trellis_toolgateway.tools.base import Tool


@dataclass(frozen=True)
class Entry:
    tool: Tool
    args_validator: Draft202012Validator
    output_validator: Draft202012Validator


def entry_of(tool: Tool) -> Entry:
    """``tool`` with its validators; ``ValueError`` for a name calls could never use
    (``TOOL_NAME``), ``SchemaError`` (naming the keyword) for a broken schema."""
    name = tool.spec.name
    if (problem := TOOL_NAME.problem(name, required=True)) is not None:
        raise ValueError(f"tool name: {problem}")
    for which in ("input_schema", "output_schema"):
        Draft202012Validator.check_schema(getattr(tool.spec, which))
    return Entry(
        tool,
        Draft202012Validator(tool.spec.input_schema),
        Draft202012Validator(tool.spec.output_schema),
    )
