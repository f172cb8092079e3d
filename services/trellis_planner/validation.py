"""Checks each planned node before it leaves the planner.

The executor starts a node as soon as it arrives, so a node must be valid on its own
and against the nodes before it: a known tool, a fresh id, object args, dependencies
only on earlier nodes, and no more than ``max_nodes`` nodes. References in args
(``"$n1"``, ``"${n1.field}"``) must name earlier nodes; a reference the model forgot to
list in ``depends_on`` is added there, since the intent is unambiguous. Violations are
named like ``plan[2].tool`` (0-based node index) for the repair round to quote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.refs import referenced_nodes
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import FieldViolation, InvalidArgument

INVALID_PLAN = "INVALID_PLAN"

_NODE_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def invalid_plan(message: str, violations: Iterable[FieldViolation]) -> InvalidArgument:
    return InvalidArgument(message, reason=INVALID_PLAN, violations=list(violations))


class PlanValidator:
    """Validates the nodes of one plan in the order the model emits them."""

    def __init__(self, tools: Iterable[str], max_nodes: int) -> None:
        self._tools = set(tools)
        self._max_nodes = max_nodes
        self._ids: list[str] = []

    @property
    def count(self) -> int:
        return len(self._ids)

    def check(self, value: Any, line: int) -> common_pb2.ToolCall:
        """The node as a ToolCall, or ``InvalidArgument(reason=INVALID_PLAN)``."""
        at = f"plan[{len(self._ids)}]"
        if len(self._ids) >= self._max_nodes:
            raise invalid_plan(
                f"plan has more than {self._max_nodes} nodes (line {line})",
                [FieldViolation("plan", f"at most {self._max_nodes} nodes")],
            )
        if not isinstance(value, Mapping):
            raise invalid_plan(
                f"{at} (line {line}) is not a JSON object",
                [FieldViolation(at, f"must be a JSON object, got {type(value).__name__}")],
            )
        violations: list[FieldViolation] = []
        node_id = value.get("node_id")
        if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
            violations.append(
                FieldViolation(f"{at}.node_id", "must be 1-64 letters, digits, '_' or '-'")
            )
        elif node_id in self._ids:
            violations.append(FieldViolation(f"{at}.node_id", f"duplicate node_id {node_id!r}"))
        tool = value.get("tool")
        if not isinstance(tool, str) or tool not in self._tools:
            known = ", ".join(sorted(self._tools)) or "none"
            violations.append(
                FieldViolation(f"{at}.tool", f"unknown tool {tool!r} (known: {known})")
            )
        args = value.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            violations.append(FieldViolation(f"{at}.args", "must be a JSON object"))
            args = {}
        depends_on = value.get("depends_on", [])
        if depends_on is None:
            depends_on = []
        if not isinstance(depends_on, list):
            violations.append(FieldViolation(f"{at}.depends_on", "must be an array of node_ids"))
            depends_on = []
        for i, dep in enumerate(depends_on):
            if dep not in self._ids:
                violations.append(
                    FieldViolation(f"{at}.depends_on[{i}]", f"{dep!r} is not an earlier node_id")
                )
        for ref in referenced_nodes(args):
            if ref not in self._ids:
                violations.append(
                    FieldViolation(f"{at}.args", f"references ${ref}, which is not an earlier node")
                )
        if violations:
            detail = "; ".join(f"{v.field}: {v.description}" for v in violations)
            raise invalid_plan(f"invalid plan node at line {line}: {detail}", violations)
        deps = list(dict.fromkeys([*depends_on, *referenced_nodes(args)]))
        self._ids.append(node_id)  # type: ignore[arg-type]  # checked above
        return common_pb2.ToolCall(
            node_id=node_id, tool=tool, args=to_struct(dict(args)), depends_on=deps
        )
