"""The executor's front door: what a request must be before anything looks it up,
stores or runs it. No gRPC here.

The rules are ``trellis.runtime.validation``'s; this module applies them to the
ExecutorService requests and names the fields as a client wrote them (``run_id``,
``goal``, ``options.model``, ``plan[2].node_id``). Reasons, in the order checked (the
first one found is the error's): ``INVALID_ID`` for the run id, session id and model name,
``GOAL_TOO_LARGE`` / ``INVALID_GOAL`` for the goal, ``INVALID_PLAN`` for an explicit
plan's nodes (ids, tool names, args depth, size and numbers).
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from trellis.executor.v1 import executor_pb2
from trellis.runtime.validation import (
    MODEL_NAME,
    RUN_ID,
    SESSION_ID,
    Problems,
    call_violations,
)

#: What a google.protobuf.Timestamp may hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799


def check_run_request(request: executor_pb2.RunRequest, max_goal_bytes: int) -> None:
    """Raise ``InvalidArgument`` naming every field of ``request`` that breaks its rule."""
    problems = Problems()
    problems.check_id("run_id", request.run_id, RUN_ID)
    problems.check_id("session_id", request.session_id, SESSION_ID)
    problems.check_text("goal", request.goal, max_goal_bytes)
    problems.check_id("options.model", request.options.model, MODEL_NAME)
    for index, call in enumerate(request.plan):
        problems.extend("INVALID_PLAN", call_violations(call, f"plan[{index}]"))
    problems.refuse("run request")


def check_run_id(run_id: str) -> None:
    """GetRun, CancelRun, ResumeRun: ``RUN_ID_REQUIRED`` when empty, ``INVALID_ID`` when
    it could not be a run id (so the store is never asked)."""
    problems = Problems()
    reason = "INVALID_ID" if run_id else "RUN_ID_REQUIRED"
    problems.check_id("run_id", run_id, RUN_ID, required=True, reason=reason)
    problems.refuse("request")


def check_session_id(session_id: str) -> None:
    """GetSession, DeleteSession: ``SESSION_ID_REQUIRED`` when empty, ``INVALID_ID`` when
    it could not be a session id (so the store is never asked)."""
    problems = Problems()
    reason = "INVALID_ID" if session_id else "SESSION_ID_REQUIRED"
    problems.check_id("session_id", session_id, SESSION_ID, required=True, reason=reason)
    problems.refuse("request")


def check_list_sessions(request: executor_pb2.ListSessionsRequest) -> None:
    """ListSessions: ``INVALID_PAGE_SIZE`` for a negative page size."""
    problems = Problems()
    if request.page_size < 0:
        problems.add("INVALID_PAGE_SIZE", "page_size", f"must be >= 0, got {request.page_size}")
    problems.refuse("list request")


def _timestamp_problem(moment: timestamp_pb2.Timestamp) -> str | None:
    if not _MIN_SECONDS <= moment.seconds <= _MAX_SECONDS:
        return "outside 0001-01-01 to 9999-12-31"
    if not 0 <= moment.nanos <= 999_999_999:
        return f"nanos must be 0 to 999999999, got {moment.nanos}"
    return None


def check_list_runs(request: executor_pb2.ListRunsRequest) -> None:
    """ListRuns: ``INVALID_PAGE_SIZE`` for a negative page size, ``INVALID_ID`` for a
    session id against its rule, ``INVALID_FILTER`` for an unknown status, a timestamp
    out of range or an empty time range. (The page token is checked with its key.)"""
    problems = Problems()
    if request.page_size < 0:
        problems.add("INVALID_PAGE_SIZE", "page_size", f"must be >= 0, got {request.page_size}")
    problems.check_id("session_id", request.session_id, SESSION_ID)
    if request.status not in executor_pb2.RunStatus.values():
        problems.add("INVALID_FILTER", "status", f"no RunStatus has the number {request.status}")
    bounds = [
        (name, getattr(request, name))
        for name in ("created_after", "created_before")
        if request.HasField(name)
    ]
    for name, moment in bounds:
        if (problem := _timestamp_problem(moment)) is not None:
            problems.add("INVALID_FILTER", name, problem)
    if len(bounds) == 2 and (
        (request.created_after.seconds, request.created_after.nanos)
        >= (request.created_before.seconds, request.created_before.nanos)
    ):
        problems.add("INVALID_FILTER", "created_before", "must be later than created_after")
    problems.refuse("list request")
