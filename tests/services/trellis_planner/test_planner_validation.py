"""Node validation: tools, ids, dependencies, references, size; violations by path."""

import pytest

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_struct, to_struct
from trellis.runtime.errors import InvalidArgument
from trellis_planner.validation import PlanValidator


def node(node_id="n1", tool="echo", args=None, depends_on=None) -> dict:
    return {"node_id": node_id, "tool": tool, "args": args or {}, "depends_on": depends_on or []}


def rejected(
    validator: PlanValidator, value: object, reason: str = "INVALID_PLAN"
) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        validator.check(value, line=7)
    assert raised.value.reason == reason
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
    error = rejected(v, node("n2"), reason="TOO_MANY_NODES")
    assert [x.field for x in error.violations] == ["plan"]


# --- args against the tool's input schema ----------------------------------------------


def spec(name: str, schema: dict) -> common_pb2.ToolSpec:
    return common_pb2.ToolSpec(name=name, input_schema=to_struct(schema))


SLEEP = spec(
    "sleep",
    {
        "type": "object",
        "properties": {"ms": {"type": "integer", "minimum": 0}},
        "required": ["ms"],
        "additionalProperties": False,
    },
)
COMMAND = spec(
    "run_command",
    {
        "type": "object",
        "properties": {"command": {"type": "string", "enum": ["uptime", "df -h"]}},
        "required": ["command"],
    },
)


def test_args_must_match_the_input_schema() -> None:
    v = PlanValidator([SLEEP, COMMAND], max_nodes=9)
    assert [(x.field, x.description) for x in rejected(v, node(tool="sleep")).violations] == [
        ("plan[0].args.ms", "'ms' is a required property")
    ]
    error = rejected(v, node(tool="sleep", args={"ms": -1, "extra": 1}))
    assert [x.field for x in error.violations] == ["plan[0].args", "plan[0].args.ms"]
    assert "'extra' was unexpected" in error.violations[0].description
    error = rejected(v, node(tool="run_command", args={"command": "rm -rf /"}))
    assert [x.field for x in error.violations] == ["plan[0].args.command"]
    assert from_struct(v.check(node(tool="sleep", args={"ms": 5}), line=1).args) == {"ms": 5}


def test_a_whole_reference_stands_for_any_value() -> None:
    v = PlanValidator([SLEEP, COMMAND], max_nodes=9)
    v.check(node(tool="sleep", args={"ms": 1}), line=1)
    v.check(node("n2", tool="sleep", args={"ms": "$n1"}), line=2)
    v.check(node("n3", tool="sleep", args={"ms": "${n1.slept_ms}"}), line=3)
    v.check(node("n4", tool="run_command", args={"command": "${n1.command}"}), line=4)
    # inside a longer string it is text: enum/pattern cannot be known, the type still is
    v.check(node("n5", tool="run_command", args={"command": "up${n1.x}"}), line=5)
    error = rejected(v, node("n6", tool="sleep", args={"ms": "${n1.a} ms"}))
    assert [x.field for x in error.violations] == ["plan[5].args.ms"]
    assert "is not of type 'integer'" in error.violations[0].description
    # a reference does not excuse a missing property or a dangling node
    error = rejected(v, node("n6", tool="sleep", args={"ms": "$n9"}))
    assert [x.field for x in error.violations] == ["plan[5].args"]


def test_a_broken_tool_schema_does_not_block_plans() -> None:
    v = PlanValidator([spec("odd", {"type": "no-such-type"})], max_nodes=9)
    assert v.check(node(tool="odd", args={"x": 1}), line=1).tool == "odd"


def test_repeats_of_accepted_nodes_are_recognised() -> None:
    v = PlanValidator([SLEEP], max_nodes=9)
    v.check(node(tool="sleep", args={"ms": 1}), line=1)
    v.check(node("n2", tool="sleep", args={"ms": "$n1"}), line=2)
    assert v.is_repeat(node(tool="sleep", args={"ms": 1}))
    assert v.is_repeat(node("n2", tool="sleep", args={"ms": "$n1"}))  # implicit depends_on
    assert not v.is_repeat(node(tool="sleep", args={"ms": 2}))
    assert not v.is_repeat(node("n3", tool="sleep", args={"ms": 1}))
    assert [c.node_id for c in v.accepted] == ["n1", "n2"] and v.count == 2


def test_a_replan_may_depend_on_earlier_rounds_but_not_reuse_their_ids() -> None:
    v = PlanValidator(["echo"], max_nodes=1, previous=["n1", "n2"])
    assert [x.field for x in rejected(v, node("n2")).violations] == ["plan[0].node_id"]
    call = v.check(node("n3", args={"value": "${n1.x}"}, depends_on=["n2"]), line=1)
    assert list(call.depends_on) == ["n2", "n1"]
    assert v.count == 1 and v.full  # earlier rounds' nodes do not count toward max_nodes
