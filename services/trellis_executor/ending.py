"""How a run that got to its end is judged: SUCCEEDED, PARTIAL or FAILED.

- An explicit plan has no join to judge its outcomes: it SUCCEEDED only when no node
  FAILED; otherwise it FAILED with the first failed node's error code, naming the node.
- A goal run whose join answered SUCCEEDED when no node failed, or when every failure
  was recovered by a later planning round; else it is PARTIAL: the answer is kept and
  the error names what failed. A failed node counts as recovered when a later round
  ran the same tool successfully (the replanner's replacement for it).
- A goal run whose join no model could answer (``unanswered``: the join's error) is
  PARTIAL with error MODEL_UNAVAILABLE: its answer is the template of its tool results
  (``fallback_answer.py``); the error's details name the cause and the failed nodes.

Nodes SKIPPED because a dependency failed are not counted: their failed dependency is.
Runs that stop before their end (deadline, cancel, cost cap, invalid plan) are judged
where they stop (``execution.py``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import TrellisError
from trellis.runtime.redact import redact_text
from trellis_executor.fallback_answer import UNANSWERED

RunStatus = executor_pb2.RunStatus
FAILED = common_pb2.NODE_STATUS_FAILED
SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
#: Failed nodes named one by one in a PARTIAL run's message; the rest are counted.
NAMED_FAILURES = 5


def unrecovered_failures(
    calls: Mapping[str, common_pb2.ToolCall],
    outcomes: Mapping[str, common_pb2.NodeOutcome],
    round_starts: Sequence[int] = (),
) -> list[common_pb2.NodeOutcome]:
    """FAILED outcomes, in the order they ended, that no later round recovered.

    ``calls`` is in planning order; ``round_starts`` holds the index of the first node
    of rounds 1, 2, ... in it (empty: one round).
    """
    order = {node_id: index for index, node_id in enumerate(calls)}

    def round_of(node_id: str) -> int:
        return bisect_right(round_starts, order[node_id])

    succeeded_later: dict[str, int] = {}  # tool -> last round where it succeeded
    for node_id, outcome in outcomes.items():
        if outcome.status == SUCCEEDED and node_id in calls:
            tool = calls[node_id].tool
            succeeded_later[tool] = max(succeeded_later.get(tool, -1), round_of(node_id))
    return [
        outcome
        for node_id, outcome in outcomes.items()
        if outcome.status == FAILED
        and not (
            node_id in calls and succeeded_later.get(calls[node_id].tool, -1) > round_of(node_id)
        )
    ]


def judged(
    *,
    explicit: bool,
    failures: Sequence[common_pb2.NodeOutcome],
    calls: Mapping[str, common_pb2.ToolCall],
    answer: str,
    unanswered: TrellisError | None = None,
) -> executor_pb2.RunFinished:
    """The ``finished`` of a run that reached its end (usage and cost filled in later)."""
    finished = executor_pb2.RunFinished(answer=answer, failed_nodes=len(failures))
    if unanswered is not None:
        finished.status = RunStatus.RUN_STATUS_PARTIAL
        message = (
            f"no model could answer ({unanswered.reason}: {unanswered.message}); the answer "
            "lists each tool's result"
        )
        if failures:
            message += f", and {_partial_message(failures, calls).removeprefix('answered, but ')}"
        finished.error.CopyFrom(
            common_pb2.Error(
                code=UNANSWERED,
                message=redact_text(message),
                retryable=unanswered.retryable,
                details={"cause": unanswered.reason, "failed_nodes": str(len(failures))},
            )
        )
        return finished
    if not failures:
        finished.status = RunStatus.RUN_STATUS_SUCCEEDED
        return finished
    first = failures[0]
    if explicit:
        finished.status = RunStatus.RUN_STATUS_FAILED
        tool = calls[first.node_id].tool if first.node_id in calls else "?"
        message = f"node {first.node_id} ({tool}) failed: {first.error.message}"
    else:
        finished.status = RunStatus.RUN_STATUS_PARTIAL
        message = _partial_message(failures, calls)
    finished.error.CopyFrom(
        common_pb2.Error(
            code=first.error.code or "NODE_FAILED",
            message=redact_text(message),
            details={"node_id": first.node_id, "failed_nodes": str(len(failures))},
        )
    )
    return finished


def _partial_message(
    failures: Sequence[common_pb2.NodeOutcome], calls: Mapping[str, common_pb2.ToolCall]
) -> str:
    named = [
        f"{o.node_id} ({calls[o.node_id].tool if o.node_id in calls else '?'}: {o.error.code})"
        for o in failures[:NAMED_FAILURES]
    ]
    more = len(failures) - len(named)
    listed = ", ".join(named) + (f" and {more} more" if more else "")
    noun = "node" if len(failures) == 1 else "nodes"
    return f"answered, but {len(failures)} {noun} failed: {listed}"
