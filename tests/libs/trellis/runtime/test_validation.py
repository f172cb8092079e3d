"""The rules a request's values must follow (trellis.runtime.validation)."""

from __future__ import annotations

import math
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import InvalidArgument
from trellis.runtime.validation import (
    CACHE_KEY,
    IDEMPOTENCY_KEY,
    MAX_ARGS_BYTES,
    MAX_ARGS_DEPTH,
    MODEL_NAME,
    NODE_ID,
    RUN_ID,
    SESSION_ID,
    TENANT_ID,
    TOOL_NAME,
    USAGE_ID,
    Problems,
    args_problem,
    call_violations,
    node_idempotency_key,
    struct_args_problem,
    text_problem,
)

HOSTILE = ["../../etc", "idc/a", "a\x00b", "a\nb", "tab\there", " lead", "é", "a b", "x" * 200]


@pytest.mark.parametrize(
    "run_id",
    [uuid.uuid4().hex, str(uuid.uuid4()), "client-42", "job_7.retry:2", "A" * 128, "x"],
)
def test_run_ids_clients_use_are_accepted(run_id: str) -> None:
    assert RUN_ID.problem(run_id) is None
    assert SESSION_ID is RUN_ID  # sessions take the run id's rule


@pytest.mark.parametrize("run_id", [*HOSTILE, "A" * 129])
def test_run_ids_with_slashes_controls_or_length_are_refused(run_id: str) -> None:
    problem = RUN_ID.problem(run_id)
    assert problem is not None and problem.startswith("must be 1-128 letters")


@pytest.mark.parametrize("node_id", ["../../etc", "a/b", "a.b", "a:b", "n\x00", "n" * 65, "n1\n"])
def test_node_ids_follow_the_planners_rule(node_id: str) -> None:
    assert NODE_ID.problem(node_id) is not None
    assert NODE_ID.problem("n1_a-B") is None


def test_empty_is_a_problem_only_when_required() -> None:
    assert RUN_ID.problem("") is None
    assert RUN_ID.problem("", required=True) == "required"


def test_a_problem_quotes_a_short_prefix_of_the_value() -> None:
    problem = RUN_ID.problem("r" * 60_000 + "\x00")
    assert problem is not None
    assert len(problem) < 150 and ("'" + "r" * 32 + "'…") in problem


@pytest.mark.parametrize(
    ("rule", "good", "bad"),
    [
        (TOOL_NAME, ["echo", "mcp.files_read", "srv:do-it"], ["rm -rf", "a/b", "t\x00", "t" * 129]),
        (TENANT_ID, ["acme", "a.b_c-1", "default"], ["-acme", "a/b", "t\x00", "t" * 65]),
        (USAGE_ID, ["run-1/plan/0", "run-1/n1/tool/0a1b"], ["a b", "u\x00", "u" * 257]),
        (IDEMPOTENCY_KEY, ["run-1/n1"], ["k\n", "k" * 257]),
        (MODEL_NAME, ["gpt-4o", "org/model", "ft:gpt-4o:acme::x1"], ["a b", "m\x00", "m" * 129]),
        (CACHE_KEY, ["0" * 64, "tool:echo"], ["k k", "k\x00", "k" * 257]),
    ],
)
def test_each_identifier_rule(rule, good: list[str], bad: list[str]) -> None:
    assert [v for v in good if rule.problem(v) is not None] == []
    assert [v for v in bad if rule.problem(v) is None] == []


_run_ids = st.from_regex(RUN_ID.pattern, fullmatch=True)
_node_ids = st.from_regex(NODE_ID.pattern, fullmatch=True)


@given(_run_ids, _node_ids, _run_ids, _node_ids)
def test_idempotency_keys_of_different_nodes_never_collide(
    run_a: str, node_a: str, run_b: str, node_b: str
) -> None:
    """The executor's key names one (run, node): it splits back into it, so runs
    ``idc/a`` + node ``b`` and ``idc`` + node ``a/b`` cannot share a key (neither
    id may hold ``/``)."""
    key_a, key_b = node_idempotency_key(run_a, node_a), node_idempotency_key(run_b, node_b)
    assert tuple(key_a.split("/")) == (run_a, node_a)
    assert (key_a == key_b) == ((run_a, node_a) == (run_b, node_b))
    assert IDEMPOTENCY_KEY.problem(key_a) is None


def test_the_ambiguous_pair_is_refused_on_both_sides() -> None:
    assert RUN_ID.problem("idc/a") is not None
    assert NODE_ID.problem("a/b") is not None


def test_text_limits_size_in_bytes_and_control_characters() -> None:
    assert text_problem("line\nnext\r\n\ttab ünïcødé 🙂", 100) is None
    assert text_problem("é" * 10, 19) == ("GOAL_TOO_LARGE", "20 bytes, over the limit of 19")
    for control in ("\x00", "\x1b", "\x7f", "\x85"):
        found = text_problem(f"ab{control}", 100)
        assert found is not None and found[0] == "INVALID_GOAL"
        assert f"U+{ord(control):04X} at offset 2" in found[1]


def nested(depth: int) -> dict:
    value: object = 1
    for _ in range(depth - 1):
        value = {"k": value}
    return {"k": value}


def test_args_depth_size_and_numbers() -> None:
    assert args_problem(nested(MAX_ARGS_DEPTH)) is None
    assert args_problem(nested(MAX_ARGS_DEPTH + 1)) == f"nested deeper than {MAX_ARGS_DEPTH} levels"
    assert args_problem({"v": [math.inf]}) == "inf is not a JSON number"
    assert args_problem({"v": 10**400}) == "a number too large for a double"
    assert struct_args_problem(to_struct(nested(MAX_ARGS_DEPTH))) is None
    assert "nested deeper" in (struct_args_problem(to_struct(nested(MAX_ARGS_DEPTH + 1))) or "")
    big = to_struct({"blob": "x" * MAX_ARGS_BYTES})
    assert struct_args_problem(big) == f"{big.ByteSize()} bytes, over the limit of {MAX_ARGS_BYTES}"
    nan = to_struct({})
    nan.fields["v"].number_value = math.nan
    assert (struct_args_problem(nan) or "").startswith("not JSON")


def test_call_violations_name_each_field() -> None:
    call = common_pb2.ToolCall(
        node_id="../../etc", tool="rm -rf", depends_on=["ok", "a/b"], args=to_struct(nested(25))
    )
    fields = [v.field for v in call_violations(call, "plan[2]")]
    assert fields == ["plan[2].node_id", "plan[2].tool", "plan[2].depends_on[1]", "plan[2].args"]
    assert call_violations(common_pb2.ToolCall(node_id="a", tool="echo"), "plan[0]") == []


def test_problems_refuse_with_the_first_reason_and_every_violation() -> None:
    problems = Problems()
    problems.refuse("nothing")  # nothing found: no error
    problems.check_id("run_id", "a/b", RUN_ID)
    problems.check_text("goal", "x" * 10, 5)
    with pytest.raises(InvalidArgument) as raised:
        problems.refuse("run request")
    assert raised.value.reason == "INVALID_ID"
    assert [v.field for v in raised.value.violations] == ["run_id", "goal"]
    assert raised.value.message.startswith("run request refused: run_id: must be")
