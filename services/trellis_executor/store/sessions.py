"""Sessions in the run store: the rows both backends share, and how content is erased.

A session is one row of ``sessions`` keyed by (tenant, session id): when it started,
when its last turn started, its context summary (and the last turn it covers), and
whether DeleteSession erased it. Its turns are its runs (``runs.session_id``) created
since the session started: a session that expired (no turn for the TTL) or was deleted
starts again, fresh, at its next turn, without the old turns. Usage and cost totals are
summed from the turns' ``finished`` rows when read, so they always agree with the runs.

Admission is race-free across replicas: the turn's run row is written in the same
transaction (PostgreSQL, under the session row's lock) or the same statement (SQLite)
that checks the session has no running turn (``SESSION_BUSY``) and room for one more
(``SESSION_FULL``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import timestamp
from trellis.runtime.errors import FailedPrecondition, NotFound

#: Characters of the last goal a session summary carries.
LAST_GOAL_CHARS = 120


@dataclass(frozen=True)
class SessionRules:
    """How long an idle session lives, and how many turns it may have."""

    ttl_seconds: float
    max_turns: int


@dataclass(frozen=True)
class SessionRecord:
    """One row of ``sessions``."""

    tenant_id: str
    session_id: str
    summary: str
    summary_through_turn: int
    created_at: datetime
    updated_at: datetime
    deleted: bool


@dataclass(frozen=True)
class SessionCursor:
    """Where a page of sessions ended: its last session's activity time (µs) and id."""

    updated_us: int
    session_id: str


def session_not_found(session_id: str) -> NotFound:
    return NotFound(
        f"no session {session_id}",
        reason="SESSION_NOT_FOUND",
        metadata={"session_id": session_id},
    )


def session_busy(session_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"session {session_id} has a turn still running; wait for it to end",
        reason="SESSION_BUSY",
        metadata={"session_id": session_id},
    )


def session_full(session_id: str, max_turns: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"session {session_id} has its {max_turns} turns; start another session",
        reason="SESSION_FULL",
        metadata={"session_id": session_id, "max_turns": str(max_turns)},
    )


# -- erasing content ------------------------------------------------------------------


def erased_request(blob: bytes) -> bytes:
    """A stored RunRequest without its goal (the explicit plan's args erased too)."""
    request = executor_pb2.RunRequest.FromString(blob)
    request.goal = ""
    for call in request.plan:
        call.args.Clear()
    return request.SerializeToString()


def erased_finished(blob: bytes | None) -> bytes | None:
    """A stored RunFinished without its answer and error text (usage and cost kept)."""
    if not blob:
        return blob
    finished = executor_pb2.RunFinished.FromString(blob)
    finished.answer = ""
    finished.error.message = ""
    finished.error.details.clear()
    return finished.SerializeToString()


def erased_call(blob: bytes) -> bytes:
    """A stored ToolCall without its arguments (id, tool and dependencies kept)."""
    call = common_pb2.ToolCall.FromString(blob)
    call.args.Clear()
    return call.SerializeToString()


def erased_outcome(blob: bytes | None) -> bytes | None:
    """A stored NodeOutcome without its output and error text (status and cost kept)."""
    if not blob:
        return blob
    outcome = common_pb2.NodeOutcome.FromString(blob)
    outcome.ClearField("output")
    outcome.error.message = ""
    outcome.error.details.clear()
    return outcome.SerializeToString()


# -- reading --------------------------------------------------------------------------


def _totals(runs: list[executor_pb2.Run]) -> tuple[common_pb2.Usage, int]:
    usage = common_pb2.Usage()
    cost = 0
    for run in runs:
        usage.input_tokens += run.usage.input_tokens
        usage.output_tokens += run.usage.output_tokens
        usage.cached_input_tokens += run.usage.cached_input_tokens
        usage.cost_nano_usd += run.usage.cost_nano_usd
        usage.estimated = usage.estimated or run.usage.estimated
        cost += run.cost_nano_usd
    return usage, cost


def build_session(record: SessionRecord, runs: list[executor_pb2.Run]) -> executor_pb2.Session:
    """The Session message of a record and its turns (oldest first)."""
    usage, cost = _totals(runs)
    session = executor_pb2.Session(
        session_id=record.session_id,
        summary=record.summary,
        summary_through_turn=record.summary_through_turn,
        usage=usage,
        cost_nano_usd=cost,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        deleted=record.deleted,
    )
    for number, run in enumerate(runs, start=1):
        session.turns.append(
            executor_pb2.SessionTurn(
                number=number,
                run_id=run.run_id,
                goal=run.goal,
                answer=run.answer,
                status=run.status,
                created_at=run.created_at,
            )
        )
    return session


def build_session_summary(
    record: SessionRecord, runs: list[executor_pb2.Run]
) -> executor_pb2.SessionSummary:
    usage, cost = _totals(runs)
    return executor_pb2.SessionSummary(
        session_id=record.session_id,
        turn_count=len(runs),
        usage=usage,
        cost_nano_usd=cost,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        last_goal=runs[-1].goal[:LAST_GOAL_CHARS] if runs else "",
        deleted=record.deleted,
    )
