"""Plan validation: every rule a node must pass before it may be dispatched.

``NodeChecker`` checks nodes one at a time, as they stream from the planner (a node
may only depend on nodes seen before it). ``order_explicit_plan`` checks a whole
explicit plan up front (cycles included) and returns it in dependency order, so
both kinds of plan then flow through the same checker and scheduler.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from graphlib import CycleError, TopologicalSorter

from trellis.common.v1 import common_pb2
from trellis.refs import referenced_nodes
from trellis.runtime.convert import from_struct
from trellis.runtime.errors import FieldViolation, InvalidArgument


class NodeChecker:
    """Checks streamed nodes against the tool catalog and the nodes before them."""

    def __init__(self, tools: Collection[str], max_nodes: int, seen: Collection[str] = ()) -> None:
        self._tools = set(tools)
        self._max_nodes = max_nodes
        self._seen: set[str] = set(seen)
        self._count = 0

    def check(self, call: common_pb2.ToolCall, where: str) -> None:
        """Raise InvalidArgument (reason INVALID_PLAN) naming every rule ``call`` breaks."""
        violations = []
        self._count += 1
        if self._count > self._max_nodes:
            raise InvalidArgument(
                f"plan has more than {self._max_nodes} nodes",
                reason="TOO_MANY_NODES",
                violations=[FieldViolation(where, f"over max_nodes={self._max_nodes}")],
            )
        if not call.node_id:
            violations.append(FieldViolation(f"{where}.node_id", "required"))
        elif call.node_id in self._seen:
            violations.append(FieldViolation(f"{where}.node_id", f"duplicate id {call.node_id!r}"))
        if call.tool not in self._tools:
            violations.append(FieldViolation(f"{where}.tool", f"unknown tool {call.tool!r}"))
        deps = list(call.depends_on)
        for dep in deps:
            if dep == call.node_id:
                violations.append(FieldViolation(f"{where}.depends_on", "depends on itself"))
            elif dep not in self._seen:
                violations.append(FieldViolation(f"{where}.depends_on", f"unknown node {dep!r}"))
        try:
            args = from_struct(call.args)
        except ValueError as error:  # NaN or Infinity: a Struct may hold them, JSON may not
            violations.append(FieldViolation(f"{where}.args", f"not JSON: {error}"))
            args = {}
        for ref in [r for r in referenced_nodes(args) if r not in deps]:
            violations.append(
                FieldViolation(f"{where}.args", f"references ${ref} not listed in depends_on")
            )
        if violations:
            raise InvalidArgument(
                f"invalid plan node {call.node_id or where}: "
                + "; ".join(f"{v.field}: {v.description}" for v in violations),
                reason="INVALID_PLAN",
                violations=violations,
            )
        self._seen.add(call.node_id)


def order_explicit_plan(
    plan: Sequence[common_pb2.ToolCall],
) -> list[tuple[int, common_pb2.ToolCall]]:
    """The plan in dependency order (with original indexes); INVALID_PLAN on a cycle."""
    ids = {call.node_id for call in plan}
    graph = {
        call.node_id: [d for d in call.depends_on if d in ids and d != call.node_id]
        for call in plan
    }
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        cycle = " -> ".join(error.args[1])
        raise InvalidArgument(
            f"plan has a cycle: {cycle}",
            reason="INVALID_PLAN",
            violations=[FieldViolation("plan", f"cycle {cycle}")],
        ) from None
    rank = {node_id: i for i, node_id in enumerate(order)}
    indexed = list(enumerate(plan))
    return sorted(indexed, key=lambda item: rank.get(item[1].node_id, -1))
