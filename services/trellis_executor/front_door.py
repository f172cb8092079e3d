"""The executor's front door: what a request must be before anything looks it up,
stores or runs it. No gRPC here.

The rules are ``trellis.runtime.validation``'s; this module applies them to the
ExecutorService requests and names the fields as a client wrote them (``run_id``,
``goal``, ``options.model``, ``plan[2].node_id``). Reasons, in the order checked (the
first one found is the error's): ``INVALID_ID`` for the run id and model name,
``GOAL_TOO_LARGE`` / ``INVALID_GOAL`` for the goal, ``INVALID_PLAN`` for an explicit
plan's nodes (ids, tool names, args depth, size and numbers).
"""

from __future__ import annotations

from trellis.executor.v1 import executor_pb2
from trellis.runtime.validation import (
    MODEL_NAME,
    RUN_ID,
    Problems,
    call_violations,
)


def check_run_request(request: executor_pb2.RunRequest, max_goal_bytes: int) -> None:
    """Raise ``InvalidArgument`` naming every field of ``request`` that breaks its rule."""
    problems = Problems()
    problems.check_id("run_id", request.run_id, RUN_ID)
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
