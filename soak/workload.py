"""The soak's mix of runs and what each kind of run is expected to end with.

Every run has a client-chosen ``run_id``. Kinds (weights in ``MIX``):

- ``demo``: the demo goal (planner, three ``run_command`` nodes, join) → SUCCEEDED.
- ``arithmetic``: an arithmetic goal with fresh numbers (never a cache hit) → SUCCEEDED.
- ``parallel``: an explicit plan, three parallel ``sleep``s of 50-250 ms joined by an
  ``echo`` of their outputs → SUCCEEDED.
- ``cancel``: an explicit plan with a 5 s ``sleep``, cancelled (CancelRun) as soon as
  the node starts → finished CANCELLED.
- ``deadline``: a 5 s ``sleep`` with a 300 ms run timeout (RunOptions.timeout) →
  finished FAILED, ``DEADLINE_EXCEEDED``.
- ``client_deadline``: a 5 s ``sleep`` whose *call* has a 500 ms deadline → the call
  ends DEADLINE_EXCEEDED at the client, and the run, its client gone, is cancelled (or,
  rarely, the gateway ends the node at that deadline and ``finished`` arrives just in
  time, with the node FAILED).
- ``invalid``: a broken explicit plan (unknown tool, cycle, unknown dependency,
  reference not in depends_on, too many nodes) → INVALID_ARGUMENT before anything runs.

Any kind may be shed: RESOURCE_EXHAUSTED with reason ``RUN_CAPACITY``. Anything else is
unexpected (a run of the first three kinds with a node that did not succeed too); a
DEADLINE_EXCEEDED (of the call, the run or a node) that a kind does not ask for is a
*timeout*.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import duration, to_struct

DEMO_GOAL = "Report this machine's OS, disk usage and uptime"
#: Generous: an admitted run must never get near it, overload is shed instead.
CALL_TIMEOUT_SECONDS = 60.0
CLIENT_DEADLINE_SECONDS = 0.5
RUN_TIMEOUT_SECONDS = 0.3
LONG_SLEEP_MS = 5_000

MIX: dict[str, float] = {
    "demo": 0.20,
    "arithmetic": 0.20,
    "parallel": 0.25,
    "cancel": 0.10,
    "deadline": 0.08,
    "client_deadline": 0.07,
    "invalid": 0.10,
}

#: Outcomes: what a run ended with, as ``classify`` sorts it.
EXPECTED, SHED, TIMEOUT, UNEXPECTED = "expected", "shed", "timeout", "unexpected"
INVALID_REASONS = ("INVALID_PLAN", "TOO_MANY_NODES")
#: Node error codes that mean a deadline cut the node short.
DEADLINE_CODES = {"DEADLINE_EXCEEDED", "TOOL_TIMEOUT"}


@dataclass(frozen=True)
class Planned:
    """One run to make: the request, its call deadline, whether to cancel it."""

    kind: str
    request: executor_pb2.RunRequest
    timeout: float
    cancel: bool = False


def node(
    node_id: str, tool: str, deps: tuple[str, ...] = (), **args: object
) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def _invalid_plan(rng: random.Random) -> tuple[list[common_pb2.ToolCall], int]:
    """A broken plan and its max_nodes (0 = the server's)."""
    which = rng.randrange(5)
    if which == 0:
        return [node("a", "no_such_tool", value=1)], 0
    if which == 1:
        return [node("a", "echo", ("b",), value=1), node("b", "echo", ("a",), value=2)], 0
    if which == 2:
        return [node("a", "echo", ("ghost",), value=1)], 0
    if which == 3:
        return [node("a", "echo", value=1), node("b", "echo", value="$a")], 0
    return [node(f"n{i}", "echo", value=i) for i in range(3)], 2


def plan_run(kind: str, run_id: str, rng: random.Random) -> Planned:
    """The request for one run of ``kind``."""
    if kind == "demo":
        return Planned(
            kind, executor_pb2.RunRequest(run_id=run_id, goal=DEMO_GOAL), CALL_TIMEOUT_SECONDS
        )
    if kind == "arithmetic":
        a, b, c = rng.randrange(2, 999), rng.randrange(2, 999), rng.randrange(1, 9999)
        goal = f"What is ({a}*{b})+{c}?"
        return Planned(
            kind, executor_pb2.RunRequest(run_id=run_id, goal=goal), CALL_TIMEOUT_SECONDS
        )
    if kind == "parallel":
        sleeps = [node(f"s{i}", "sleep", ms=rng.randrange(50, 250)) for i in range(3)]
        join = node(
            "join",
            "echo",
            tuple(s.node_id for s in sleeps),
            value=["$s0", "${s1.slept_ms}", "${s2.slept_ms}"],
        )
        request = executor_pb2.RunRequest(run_id=run_id, plan=[*sleeps, join])
        return Planned(kind, request, CALL_TIMEOUT_SECONDS)
    long_sleep = [node("nap", "sleep", ms=LONG_SLEEP_MS)]
    if kind == "cancel":
        request = executor_pb2.RunRequest(run_id=run_id, plan=long_sleep)
        return Planned(kind, request, CALL_TIMEOUT_SECONDS, cancel=True)
    if kind == "deadline":
        options = executor_pb2.RunOptions(timeout=duration(RUN_TIMEOUT_SECONDS))
        request = executor_pb2.RunRequest(run_id=run_id, plan=long_sleep, options=options)
        return Planned(kind, request, CALL_TIMEOUT_SECONDS)
    if kind == "client_deadline":
        request = executor_pb2.RunRequest(run_id=run_id, plan=long_sleep)
        return Planned(kind, request, CLIENT_DEADLINE_SECONDS)
    if kind == "invalid":
        plan, max_nodes = _invalid_plan(rng)
        options = executor_pb2.RunOptions(max_nodes=max_nodes)
        request = executor_pb2.RunRequest(run_id=run_id, plan=plan, options=options)
        return Planned(kind, request, CALL_TIMEOUT_SECONDS)
    raise ValueError(f"unknown kind {kind!r}")


def pick_kind(rng: random.Random) -> str:
    kinds = list(MIX)
    return rng.choices(kinds, weights=[MIX[k] for k in kinds])[0]


def classify(
    kind: str,
    code: str | None,
    reason: str,
    status: str | None,
    run_error: str,
    node_errors: Sequence[str] = (),
) -> str:
    """EXPECTED, SHED, TIMEOUT or UNEXPECTED for a run of ``kind`` that ended with the
    call's gRPC ``code`` (None: OK) and ``reason``, the finished ``status``, its error
    code ``run_error`` and the error codes of its nodes that did not succeed."""
    if code == "RESOURCE_EXHAUSTED" and reason == "RUN_CAPACITY":
        return SHED
    if code is None:
        if kind in ("demo", "arithmetic", "parallel"):
            if status == "SUCCEEDED" and not node_errors:
                return EXPECTED
        elif kind == "cancel" and (status, run_error) == ("CANCELLED", "CANCELLED"):
            return EXPECTED
        elif kind == "deadline" and (status, run_error) == ("FAILED", "DEADLINE_EXCEEDED"):
            return EXPECTED
        elif kind == "client_deadline" and node_errors:
            # the run reached its end just as the call's deadline cut its node short (the
            # gateway bounds a tool by its caller's deadline) and told the client in time
            return EXPECTED
        if run_error == "DEADLINE_EXCEEDED" or set(node_errors) & DEADLINE_CODES:
            return TIMEOUT
        return UNEXPECTED
    if kind == "client_deadline" and code == "DEADLINE_EXCEEDED":
        return EXPECTED
    if kind == "invalid" and code == "INVALID_ARGUMENT" and reason in INVALID_REASONS:
        return EXPECTED
    if code == "DEADLINE_EXCEEDED":
        return TIMEOUT
    return UNEXPECTED
