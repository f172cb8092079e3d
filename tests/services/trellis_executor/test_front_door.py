"""The executor's front door (front_door.py): which field, which reason, in which order."""

from __future__ import annotations

import uuid

import pytest

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import InvalidArgument
from trellis_executor.front_door import (
    check_list_sessions,
    check_run_id,
    check_run_request,
    check_session_id,
)


def refusal(request: executor_pb2.RunRequest, max_goal_bytes: int = 100) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        check_run_request(request, max_goal_bytes)
    return raised.value


def test_a_good_request_passes() -> None:
    plan = [common_pb2.ToolCall(node_id="n-1", tool="echo", depends_on=[])]
    request = executor_pb2.RunRequest(run_id=uuid.uuid4().hex, goal="two\nlines\tand é", plan=plan)
    request.options.model = "org/model-1"
    check_run_request(request, 100)


def test_every_bad_field_is_named_and_the_first_decides_the_reason() -> None:
    request = executor_pb2.RunRequest(
        run_id="../x",
        goal="x" * 101,
        plan=[common_pb2.ToolCall(node_id="ok", tool="echo", depends_on=["a/b"])],
    )
    request.options.model = "has space"
    error = refusal(request)
    assert error.reason == "INVALID_ID"
    assert [v.field for v in error.violations] == [
        "run_id",
        "goal",
        "options.model",
        "plan[0].depends_on[0]",
    ]
    assert refusal(executor_pb2.RunRequest(goal="x" * 101)).reason == "GOAL_TOO_LARGE"
    assert refusal(executor_pb2.RunRequest(goal="\x1b[31m")).reason == "INVALID_GOAL"
    bad_node = executor_pb2.RunRequest(plan=[common_pb2.ToolCall(node_id="", tool="echo")])
    error = refusal(bad_node)
    assert (error.reason, error.violations[0].field) == ("INVALID_PLAN", "plan[0].node_id")


def test_lookups_need_a_run_id_that_could_exist() -> None:
    check_run_id("run-1")
    for run_id, reason in (
        ("", "RUN_ID_REQUIRED"),
        ("a\x00", "INVALID_ID"),
        ("r" * 129, "INVALID_ID"),
    ):
        with pytest.raises(InvalidArgument) as raised:
            check_run_id(run_id)
        assert raised.value.reason == reason
        assert [v.field for v in raised.value.violations] == ["run_id"]


def test_session_ids_follow_the_run_id_rule() -> None:
    check_run_request(executor_pb2.RunRequest(goal="g", session_id="chat-1.a:b"), 100)
    error = refusal(executor_pb2.RunRequest(goal="g", session_id="a/b"))
    assert (error.reason, [v.field for v in error.violations]) == ("INVALID_ID", ["session_id"])
    check_session_id("chat-1")
    for session_id, reason in [("", "SESSION_ID_REQUIRED"), ("x" * 129, "INVALID_ID")]:
        with pytest.raises(InvalidArgument) as raised:
            check_session_id(session_id)
        assert raised.value.reason == reason
    check_list_sessions(executor_pb2.ListSessionsRequest(page_size=5))
    with pytest.raises(InvalidArgument) as negative:
        check_list_sessions(executor_pb2.ListSessionsRequest(page_size=-1))
    assert negative.value.reason == "INVALID_PAGE_SIZE"
