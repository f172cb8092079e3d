"""What the API holds the model to: the plan's JSON Schema and the tools as functions.

``json_schema``: the plan is one object ``{"nodes": [...]}``; each node is one of the
catalog's tools (``anyOf`` one branch per tool: its name as an enum, its description,
its args schema), with ``node_id`` (the id pattern) and ``depends_on``. It is sent
``strict`` when every args schema fits the subset strict mode accepts, rewritten to it:
every object closed (``additionalProperties: false``) with every property required (the
optional ones nullable: ``restore_optional`` drops their nulls again before validation),
validation keywords dropped (the planner's own validator still checks the real schema),
and every non-string value also allowed to be a whole reference (``"$n1"``), since a
node's args may take an earlier node's output. An argument of any type (``{}``) becomes
a scalar or a list of scalars. A free-form object (no ``properties``) or a ``$ref`` does
not fit: the format is then sent with ``strict: false`` and those tools' own schemas.

``tool_calls``: each tool is a function with its own input schema as ``parameters``
(not strict: strict function calling does not allow parallel calls). Function names
allow fewer characters than tool names (``[A-Za-z0-9_-]{1,64}``), so ``FunctionNames``
maps each tool to a name that fits, the same way for every call of the catalog.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_struct

SCHEMA_NAME = "trellis_plan"
NODE_ID_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
#: A whole reference to an earlier node's output: ``$n1`` or ``${n1.field}``.
REFERENCE_PATTERN = r"^\$(\{[A-Za-z0-9_-]+(\.[^}]*)?\}|[A-Za-z0-9_-]+)$"
_SCALARS = ("string", "number", "boolean", "null")
_FUNCTION_NAME = re.compile(r"[^A-Za-z0-9_-]")
MAX_FUNCTION_NAME = 64


class _Unfit(Exception):
    """A schema that strict mode cannot express."""


def _reference() -> dict[str, Any]:
    return {"type": "string", "pattern": REFERENCE_PATTERN}


def _described(out: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(schema.get("description"), str):
        out["description"] = schema["description"]
    return out


def _any() -> dict[str, Any]:
    scalars = [{"type": t} for t in _SCALARS]
    return {"anyOf": [*scalars, {"type": "array", "items": {"anyOf": scalars}}]}


def _strict(schema: Any) -> dict[str, Any]:
    """``schema`` in strict mode's subset (raises _Unfit when it cannot be)."""
    if schema is True or schema == {}:
        return _any()
    if not isinstance(schema, Mapping) or "$ref" in schema:
        raise _Unfit
    if "enum" in schema or "const" in schema:
        values = list(schema["enum"]) if "enum" in schema else [schema["const"]]
        return _described({"enum": values}, schema)
    branches = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(branches, list):
        return _described({"anyOf": [_strict(b) for b in branches]}, schema)
    kind = schema.get("type")
    if isinstance(kind, list):
        inner = {k: v for k, v in schema.items() if k not in ("type", "description")}
        return _described({"anyOf": [_strict({**inner, "type": t}) for t in kind]}, schema)
    if kind is None:
        if "properties" in schema:
            kind = "object"
        elif "items" in schema:
            kind = "array"
        else:
            return _described(_any(), schema)
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            raise _Unfit  # a free-form object
        if not properties:
            return _described(_no_args(), schema)
        required = set(schema.get("required") or ())
        fields: dict[str, Any] = {}
        for name, sub in properties.items():
            field = _strict(sub)
            fields[name] = field if name in required else {"anyOf": [field, {"type": "null"}]}
        out = {
            "type": "object",
            "properties": fields,
            "required": list(fields),
            "additionalProperties": False,
        }
        return _described(out, schema)
    if kind == "array":
        items = schema.get("items", {})
        return _described({"type": "array", "items": _strict(items)}, schema)
    if kind == "string":
        return _described({"type": "string"}, schema)
    if kind in ("number", "integer", "boolean", "null"):
        return _described({"anyOf": [{"type": kind}, _reference()]}, schema)
    raise _Unfit


def strict_args(schema: Mapping[str, Any]) -> dict[str, Any] | None:
    """A tool's args schema rewritten for strict mode; None when it does not fit."""
    try:
        return _strict(dict(schema) or {"type": "object", "properties": {}})
    except _Unfit:
        return None
    except RecursionError:
        return None


def _no_args() -> dict[str, Any]:
    return {"type": "object", "properties": {}, "required": [], "additionalProperties": False}


def plan_schema(tools: Iterable[common_pb2.ToolSpec]) -> tuple[dict[str, Any], bool]:
    """The plan's JSON Schema for this catalog, and whether it may be sent strict (the
    most nodes, ``maxItems``, is not a keyword strict mode takes: the prompt and the
    validator hold the plan to it)."""
    branches = []
    strict = True
    for spec in tools:
        own = from_struct(spec.input_schema)
        args = strict_args(own)
        if args is None:
            strict = False
            args = own
        branch = {
            "type": "object",
            "description": spec.description,
            "properties": {
                "node_id": {"type": "string", "pattern": NODE_ID_PATTERN},
                "tool": {"type": "string", "enum": [spec.name]},
                "args": args,
                "depends_on": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["node_id", "tool", "args", "depends_on"],
            "additionalProperties": False,
        }
        branches.append(branch)
    nodes: dict[str, Any] = {"type": "array", "items": {"anyOf": branches}}
    if not branches:  # no tool: the plan can only be empty
        nodes = {"type": "array", "maxItems": 0}
        strict = False
    schema = {
        "type": "object",
        "properties": {"nodes": nodes},
        "required": ["nodes"],
        "additionalProperties": False,
    }
    return schema, strict


def response_format(tools: Iterable[common_pb2.ToolSpec]) -> dict[str, Any]:
    """The ``response_format`` of a json_schema plan call."""
    schema, strict = plan_schema(tools)
    return {
        "type": "json_schema",
        "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": strict},
    }


def restore_optional(args: Any, schema: Any) -> Any:
    """``args`` without the nulls strict mode made the model write for the optional
    properties of ``schema`` (and of the objects nested in it)."""
    if not isinstance(args, dict) or not isinstance(schema, Mapping):
        return args
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return args
    required = set(schema.get("required") or ())
    out = {}
    for name, value in args.items():
        if value is None and name not in required:
            continue
        out[name] = restore_optional(value, properties.get(name))
    return out


class FunctionNames:
    """Tool name <-> function name, stable for a catalog: characters outside
    ``[A-Za-z0-9_-]`` become ``_``, a long name is cut and given a short hash, and a
    clash gets ``_2``, ``_3``... in the catalog's sorted order."""

    def __init__(self, tools: Iterable[str]) -> None:
        self._to_function: dict[str, str] = {}
        self._to_tool: dict[str, str] = {}
        for tool in sorted(set(tools)):
            base = _FUNCTION_NAME.sub("_", tool)
            if len(base) > MAX_FUNCTION_NAME:
                digest = hashlib.sha256(tool.encode()).hexdigest()[:8]
                base = f"{base[: MAX_FUNCTION_NAME - 9]}_{digest}"
            name, n = base, 1
            while name in self._to_tool:
                n += 1
                suffix = f"_{n}"
                name = base[: MAX_FUNCTION_NAME - len(suffix)] + suffix
            self._to_function[tool] = name
            self._to_tool[name] = tool

    def function(self, tool: str) -> str:
        return self._to_function.get(tool, tool)

    def tool(self, function: str) -> str:
        """The tool a function name stands for (the name itself when it is unknown)."""
        return self._to_tool.get(function, function)


def tool_definitions(
    tools: Iterable[common_pb2.ToolSpec], names: FunctionNames
) -> list[dict[str, Any]]:
    """The ``tools`` of a tool_calls request: one function per tool, its own schema."""
    out = []
    for spec in tools:
        parameters = from_struct(spec.input_schema) or {"type": "object", "properties": {}}
        out.append(
            {
                "type": "function",
                "function": {
                    "name": names.function(spec.name),
                    "description": " ".join(
                        [spec.description, *(f"({hint})" for hint in batch_hint(spec).values())]
                    ).strip(),
                    "parameters": parameters,
                },
            }
        )
    return out


# -- batchable tools ----------------------------------------------------------------------
# A tool the gateway batches (ToolSpec.batch_max_items) is marked in its catalog line, so a
# model emits one independent call per item for it (ten summaries: ten nodes), which run
# together as one request, rather than folding the items into one call or chaining them.

BATCH_HINT = (
    "up to {n} calls of this tool run together as one request: write one independent call per item"
)


def batch_hint(spec: common_pb2.ToolSpec) -> dict[str, str]:
    """``{"batch": ...}`` for a batchable tool's catalog line, else nothing."""
    if spec.batch_max_items <= 1:
        return {}
    return {"batch": BATCH_HINT.format(n=spec.batch_max_items)}
