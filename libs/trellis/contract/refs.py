"""References from a node's args to earlier outputs: ``"$n1"`` and ``"${n1.path.to.field}"``.

The syntax is part of the contract (common.proto, ToolCall), so it lives here once: the
planner checks references as nodes stream out, the executor resolves them.

A string that is exactly one reference is replaced by the referenced value (any JSON
type); references inside a longer string are interpolated as text. Path segments
index dicts by key and lists by position.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from trellis.runtime.errors import FieldViolation, InvalidArgument

#: Used with ``fullmatch``: ``^...$`` would also take ``"$n1\n"`` ("$" matches before "\n").
_WHOLE = re.compile(r"\$([A-Za-z0-9_\-]+)")
_BRACED = re.compile(r"\$\{([A-Za-z0-9_\-]+)((?:\.[^.{}]+)*)\}")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def referenced_nodes(value: Any) -> list[str]:
    """Ids of every node referenced anywhere in ``value``, in order of appearance, once each."""
    found: list[str] = []
    for text in _strings(value):
        whole = _WHOLE.fullmatch(text)
        found.extend([whole.group(1)] if whole else [m.group(1) for m in _BRACED.finditer(text)])
    return list(dict.fromkeys(found))


def _lookup(node_id: str, path: str, outputs: Mapping[str, Any], where: str) -> Any:
    if node_id not in outputs:
        raise InvalidArgument(
            f"{where}: reference to ${node_id} has no output",
            reason="REFERENCE_UNRESOLVED",
            violations=[FieldViolation(where, f"no output of node {node_id!r}")],
        )
    value = outputs[node_id]
    for segment in filter(None, path.split(".")):
        if isinstance(value, Mapping) and segment in value:
            value = value[segment]
        elif (
            isinstance(value, list)
            and segment.isascii()  # "²".isdigit() holds, but int("²") fails
            and segment.isdigit()
            and int(segment) < len(value)
        ):
            value = value[int(segment)]
        else:
            raise InvalidArgument(
                f"{where}: ${{{node_id}{path}}} has no field {segment!r}",
                reason="REFERENCE_UNRESOLVED",
                violations=[FieldViolation(where, f"missing path {node_id}{path}")],
            )
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def resolve(value: Any, outputs: Mapping[str, Any], where: str = "args") -> Any:
    """``value`` with every reference replaced from ``outputs`` (node id -> output)."""
    if isinstance(value, str):
        whole = _WHOLE.fullmatch(value)
        if whole:
            return _lookup(whole.group(1), "", outputs, where)
        braced = _BRACED.fullmatch(value)
        if braced:
            return _lookup(braced.group(1), braced.group(2), outputs, where)
        return _BRACED.sub(
            lambda m: _as_text(_lookup(m.group(1), m.group(2), outputs, where)), value
        )
    if isinstance(value, Mapping):
        return {k: resolve(v, outputs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outputs, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
