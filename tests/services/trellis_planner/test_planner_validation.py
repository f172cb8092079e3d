"""Node validation: tools, ids, dependencies, references, size; violations by path."""

import pytest

from trellis.runtime.convert import from_struct
from trellis.runtime.errors import InvalidArgument
from trellis_planner.validation import PlanValidator


def node(node_id="n1", tool="echo", args=None, depends_on=None) -> dict:
    return {"node_id": node_id, "tool": tool, "args": args or {}, "depends_on": depends_on or []}


def rejected(validator: PlanValidator, value: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        validator.check(value, line=7)
    assert raised.value.reason == "INVALID_PLAN"
    return raised.value


def test_valid_nodes_become_tool_calls() -> None:
    v = PlanValidator(["echo", "sleep"], max_nodes=5)
    first = v.check(node(args={"value": {"x": [1, "a"]}}), line=1)
    second = v.check({"node_id": "n2", "tool": "sleep", "depends_on": ["n1"]}, line=2)
    assert (first.node_id, first.tool, from_struct(first.args)) == (
        "n1",
        "echo",
        {"value": {"x": [1, "a"]}},
    )
    assert (second.tool, list(second.depends_on), from_struct(second.args)) == ("sleep", ["n1"], {})


def test_unknown_tool_is_named_by_its_index() -> None:
    v = PlanValidator(["echo"], max_nodes=5)
    v.check(node(), line=1)
    v.check(node("n2"), line=2)
    error = rejected(v, node("n3", tool="rm"))
    assert [x.field for x in error.violations] == ["plan[2].tool"]
    assert "'rm'" in error.violations[0].description and "line 7" in error.message


def test_duplicate_ids_later_dependencies_and_bad_shapes() -> None:
    v = PlanValidator(["echo"], max_nodes=5)
    v.check(node(), line=1)
    assert [x.field for x in rejected(v, node("n1")).violations] == ["plan[1].node_id"]
    assert [x.field for x in rejected(v, node("n2", depends_on=["n1", "n3"])).violations] == [
        "plan[1].depends_on[1]"
    ]
    assert [x.field for x in rejected(v, node("n 2")).violations] == ["plan[1].node_id"]
    assert [x.field for x in rejected(v, {**node("n2"), "args": [1]}).violations] == [
        "plan[1].args"
    ]
    assert [x.field for x in rejected(v, ["not", "an", "object"]).violations] == ["plan[1]"]


def test_references_must_be_earlier_and_are_added_to_depends_on() -> None:
    v = PlanValidator(["echo"], max_nodes=5)
    v.check(node(), line=1)
    call = v.check(node("n2", args={"value": "$n1", "s": "x ${n1.a.b} y"}), line=2)
    assert list(call.depends_on) == ["n1"]
    error = rejected(v, node("n3", args={"value": "${n9.x}"}))
    assert [x.field for x in error.violations] == ["plan[2].args"]


def test_at_most_max_nodes() -> None:
    v = PlanValidator(["echo"], max_nodes=1)
    v.check(node(), line=1)
    error = rejected(v, node("n2"))
    assert [x.field for x in error.violations] == ["plan"]
