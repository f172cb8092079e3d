"""Plan validation: every rule a node must pass before it may be dispatched.

``NodeChecker`` checks nodes one at a time, as they stream from the planner (a node
may only depend on nodes seen before it). ``order_explicit_plan`` checks a whole
explicit plan up front (cycles included) and returns it in dependency order, so
both kinds of plan then flow through the same checker and scheduler. What a node must
be on its own (id and tool name rules, args depth, size and numbers) is
``trellis.runtime.validation.call_violations``, the rules the front door applies too.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from graphlib import CycleError, TopologicalSorter

from trellis.common.v1 import common_pb2
from trellis.contract.refs import referenced_nodes
from trellis.runtime.convert import from_struct
from trellis.runtime.errors import FieldViolation, InvalidArgument, quote
from trellis.runtime.validation import call_violations


class NodeChecker:
    """Checks streamed nodes against the tool catalog and the nodes before them."""

    def __init__(self, tools: Collection[str], max_nodes: int, seen: Collection[str] = ()) -> None:
        self._tools = set(tools)
        self._max_nodes = max_nodes
        self._seen: set[str] = set(seen)
        self._count = 0

    def check(self, call: common_pb2.ToolCall, where: str) -> None:
        """Raise InvalidArgument (reason INVALID_PLAN) naming every rule ``call`` breaks."""
        self._count += 1
        if self._count > self._max_nodes:
            raise InvalidArgument(
                f"plan has more than {self._max_nodes} nodes",
                reason="TOO_MANY_NODES",
                violations=[FieldViolation(where, f"over max_nodes={self._max_nodes}")],
            )
        violations = call_violations(call, where)  # ids, tool name, args bounds
        broken = {v.field for v in violations}
        if f"{where}.node_id" not in broken and call.node_id in self._seen:
            violations.append(
                FieldViolation(f"{where}.node_id", f"duplicate id {quote(call.node_id)}")
            )
        if f"{where}.tool" not in broken and call.tool not in self._tools:
            violations.append(FieldViolation(f"{where}.tool", f"unknown tool {quote(call.tool)}"))
        deps = list(call.depends_on)
        for index, dep in enumerate(deps):
            if f"{where}.depends_on[{index}]" in broken:
                continue
            if dep == call.node_id:
                violations.append(FieldViolation(f"{where}.depends_on", "depends on itself"))
            elif dep not in self._seen:
                violations.append(
                    FieldViolation(f"{where}.depends_on", f"unknown node {quote(dep)}")
                )
        args = {} if f"{where}.args" in broken else from_struct(call.args)
        for ref in [r for r in referenced_nodes(args) if r not in deps]:
            violations.append(
                FieldViolation(f"{where}.args", f"references ${ref} not listed in depends_on")
            )
        if violations:
            raise InvalidArgument(
                f"invalid plan node {where}: "
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
