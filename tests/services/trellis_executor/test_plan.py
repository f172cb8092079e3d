"""Plan validation: streamed nodes one by one, explicit plans as a whole."""

import pytest

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import InvalidArgument
from trellis_executor.plan import NodeChecker, order_explicit_plan


def call(node_id: str, tool: str = "echo", deps=(), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def violations(checker: NodeChecker, node: common_pb2.ToolCall) -> list[str]:
    with pytest.raises(InvalidArgument) as raised:
        checker.check(node, "plan[0]")
    return [f"{v.field}: {v.description}" for v in raised.value.violations]


def test_valid_nodes_pass_in_order() -> None:
    checker = NodeChecker(["echo"], max_nodes=5)
    checker.check(call("a"), "plan[0]")
    checker.check(call("b", deps=["a"], value="$a"), "plan[1]")


def test_each_broken_rule_is_a_violation() -> None:
    checker = NodeChecker(["echo"], max_nodes=5)
    checker.check(call("a"), "plan[0]")
    assert violations(checker, call("a")) == ["plan[0].node_id: duplicate id 'a'"]
    assert violations(checker, call("b", tool="rm")) == ["plan[0].tool: unknown tool 'rm'"]
    assert violations(checker, call("c", deps=["zz"])) == ["plan[0].depends_on: unknown node 'zz'"]
    assert violations(checker, call("d", value="${a.x}")) == [
        "plan[0].args: references $a not listed in depends_on"
    ]


def test_too_many_nodes() -> None:
    checker = NodeChecker(["echo"], max_nodes=1)
    checker.check(call("a"), "plan[0]")
    with pytest.raises(InvalidArgument) as raised:
        checker.check(call("b"), "plan[1]")
    assert raised.value.reason == "TOO_MANY_NODES"


def test_explicit_plan_is_ordered_by_dependencies() -> None:
    plan = [call("c", deps=["b"]), call("a"), call("b", deps=["a"])]
    assert [c.node_id for _, c in order_explicit_plan(plan)] == ["a", "b", "c"]
    assert [i for i, _ in order_explicit_plan(plan)] == [1, 2, 0]


def test_explicit_plan_cycle_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as raised:
        order_explicit_plan([call("a", deps=["b"]), call("b", deps=["a"])])
    assert raised.value.reason == "INVALID_PLAN"
    assert "cycle" in raised.value.message
