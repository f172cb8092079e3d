"""Properties of the DAG validators: the executor's (trellis_executor.plan: explicit plans
and streamed nodes) and the planner's (trellis_planner.validation: the model's nodes).

Arbitrary plans are refused only with InvalidArgument carrying a stable reason, and the
executor accepts exactly the plans an independent oracle calls valid; valid DAGs,
given in any order, are accepted with every id and call kept and dependencies first;
whatever the planner accepts survives the wire and is accepted by the executor.
"""

from __future__ import annotations

import math
from graphlib import CycleError, TopologicalSorter
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from tests.properties.strategies import (
    arbitrary_values,
    json_keys,
    json_scalars,
    json_values,
    ref_values,
    small_ids,
)
from trellis.common.v1 import common_pb2
from trellis.contract.refs import referenced_nodes
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import from_struct, to_struct
from trellis.runtime.errors import InvalidArgument
from trellis_executor.plan import NodeChecker, order_explicit_plan
from trellis_planner.validation import PlanValidator

TOOLS = ["echo", "sleep", "arithmetic"]
#: Every reason the executor's plan checks refuse a plan with (plan.py).
EXECUTOR_PLAN_CODES = {"INVALID_PLAN", "TOO_MANY_NODES"}
#: Every reason the planner's validator refuses a node with (validation.py).
PLANNER_PLAN_CODES = {"INVALID_PLAN", "TOO_MANY_NODES"}


def check_explicit_plan(plan: list[common_pb2.ToolCall], max_nodes: int) -> list[int]:
    """What the executor does with an explicit plan before running it (runner.py):
    order it, then check every node; the original indexes in dependency order."""
    checker = NodeChecker(TOOLS, max_nodes)
    order = order_explicit_plan(plan)
    for index, call in order:
        checker.check(call, f"plan[{index}]")
    return [index for index, _ in order]


# -- arbitrary plans ------------------------------------------------------------------


@st.composite
def struct_args(draw: st.DrawFn) -> Any:
    """A Struct of args as a gRPC client may send it: JSON with references, or
    a number JSON cannot carry (NaN, Infinity) that protobuf happily holds."""
    args = to_struct(draw(st.dictionaries(json_keys, ref_values, max_size=3)))
    if draw(st.integers(0, 9)) == 0:
        args.fields["bad"].number_value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return args


tool_calls = st.builds(
    common_pb2.ToolCall,
    node_id=small_ids,
    tool=st.sampled_from([*TOOLS, "rm", ""]),
    args=struct_args(),
    depends_on=st.lists(small_ids, max_size=3),
)


def oracle_valid(plan: list[common_pb2.ToolCall], max_nodes: int) -> bool:
    """The rules, stated once more and independently of plan.py."""
    ids = [call.node_id for call in plan]
    if len(plan) > max_nodes or "" in ids or len(set(ids)) != len(ids):
        return False
    for call in plan:
        if call.tool not in TOOLS:
            return False
        if any(dep == call.node_id or dep not in ids for dep in call.depends_on):
            return False
        try:
            args = from_struct(call.args)
        except ValueError:
            return False
        if not set(referenced_nodes(args)) <= set(call.depends_on):
            return False
    try:
        TopologicalSorter({c.node_id: list(c.depends_on) for c in plan}).prepare()
    except CycleError:
        return False
    return True


@given(st.lists(tool_calls, max_size=7), st.integers(1, 8))
@example([common_pb2.ToolCall(node_id="a", tool="echo", args=to_struct({"v": math.nan}))], 5)
def test_executor_refuses_only_with_stable_codes_and_exactly_the_invalid_plans(
    plan: list[common_pb2.ToolCall], max_nodes: int
) -> None:
    try:
        order = check_explicit_plan(plan, max_nodes)
    except InvalidArgument as error:
        assert error.reason in EXECUTOR_PLAN_CODES
        assert error.violations
        assert not oracle_valid(plan, max_nodes)
    else:
        assert oracle_valid(plan, max_nodes)
        assert sorted(order) == list(range(len(plan)))


# -- valid plans ----------------------------------------------------------------------


@st.composite
def valid_dags(draw: st.DrawFn) -> list[common_pb2.ToolCall]:
    """A valid DAG: unique ids, dependencies on earlier nodes, references only to them."""
    count = draw(st.integers(0, 10))
    ids = draw(
        st.lists(
            st.from_regex(r"[A-Za-z0-9_\-]{1,10}", fullmatch=True),
            min_size=count,
            max_size=count,
            unique=True,
        )
    )
    plan = []
    for i, node_id in enumerate(ids):
        deps = draw(st.lists(st.sampled_from(ids[:i]), unique=True, max_size=3)) if i else []
        args = draw(
            st.dictionaries(json_keys, json_scalars | json_values(max_leaves=3), max_size=2)
        )
        for dep in deps:
            if draw(st.booleans()):
                args[f"ref_{dep}"] = draw(st.sampled_from([f"${dep}", f"${{{dep}.x}}"]))
        tool = draw(st.sampled_from(TOOLS))
        plan.append(
            common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)
        )
    return plan


@given(valid_dags(), st.randoms(use_true_random=False))
def test_valid_dags_in_any_order_are_accepted_with_ids_kept_and_dependencies_first(
    plan: list[common_pb2.ToolCall], rng
) -> None:
    shuffled = list(plan)
    rng.shuffle(shuffled)
    ordered = order_explicit_plan(shuffled)
    assert sorted(index for index, _ in ordered) == list(range(len(shuffled)))
    for index, call in ordered:
        assert call == shuffled[index]
    position = {call.node_id: i for i, (_, call) in enumerate(ordered)}
    for _, call in ordered:
        assert all(position[dep] < position[call.node_id] for dep in call.depends_on)
    assert sorted(check_explicit_plan(shuffled, max_nodes=len(plan) or 1)) == list(range(len(plan)))


@given(valid_dags())
def test_the_planner_accepts_a_valid_streamed_plan_unchanged_and_in_order(
    plan: list[common_pb2.ToolCall],
) -> None:
    validator = PlanValidator(TOOLS, max_nodes=max(len(plan), 1))
    executor = NodeChecker(TOOLS, max_nodes=max(len(plan), 1))
    for line, call in enumerate(plan, start=1):
        value = {
            "node_id": call.node_id,
            "tool": call.tool,
            "args": from_struct(call.args),
            "depends_on": list(call.depends_on),
        }
        accepted = validator.check(value, line)
        assert accepted.node_id == call.node_id and accepted.tool == call.tool
        assert from_struct(accepted.args) == from_struct(call.args)
        assert list(accepted.depends_on) == list(call.depends_on)
        executor.check(accepted, f"plan[{line - 1}]")
    assert [c.node_id for c in validator.accepted] == [c.node_id for c in plan]


# -- the model's nodes ------------------------------------------------------------------

model_nodes = st.one_of(
    arbitrary_values,
    st.fixed_dictionaries(
        {},
        optional={
            "node_id": small_ids | arbitrary_values,
            "tool": st.sampled_from([*TOOLS, "rm"]) | arbitrary_values,
            "args": st.dictionaries(json_keys, arbitrary_values, max_size=3) | arbitrary_values,
            "depends_on": st.lists(small_ids | arbitrary_values, max_size=3) | arbitrary_values,
        },
    ),
)


@given(st.lists(model_nodes, max_size=6), st.integers(1, 6), st.lists(small_ids, max_size=2))
@example([{"node_id": "a", "tool": "echo", "depends_on": [{}]}], 3, [])  # unhashable dep
@example([{"node_id": "a", "tool": "echo"}, None], 1, [])  # a full plan: TOO_MANY_NODES
@example([{"node_id": "a", "tool": "echo", "args": {"v": 10**400}}], 3, [])  # no double
@example([{"node_id": "a", "tool": "echo", "args": {"v": math.nan}}], 3, [])  # not JSON
@example(
    [{"node_id": "a", "tool": "echo", "args": {"v": [[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]}}],
    3,
    [],
)
def test_planner_refuses_only_with_invalid_plan_and_what_it_accepts_the_executor_accepts(
    values: list[Any], max_nodes: int, previous: list[str]
) -> None:
    validator = PlanValidator(TOOLS, max_nodes, previous=previous)
    executor = NodeChecker(TOOLS, max_nodes + len(previous), seen=previous)
    for line, value in enumerate(values, start=1):
        validator.is_repeat(value)  # the repair round asks this of every line: never raises
        try:
            call = validator.check(value, line)
        except InvalidArgument as error:
            assert error.reason in PLANNER_PLAN_CODES
            # too many nodes exactly when the plan is full, never for anything else
            assert (error.reason == "TOO_MANY_NODES") == validator.full, (error, validator.count)
            assert error.violations
            continue
        # what was accepted crosses the wire to the executor and passes its checks there
        wire = planner_pb2.PlanResponse.FromString(
            planner_pb2.PlanResponse(node=call).SerializeToString()
        ).node
        assert wire == call
        from_struct(wire.args)
        executor.check(wire, f"plan[{line - 1}]")
