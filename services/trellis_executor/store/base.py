"""What the runner needs from a run store, whichever database holds it.

Contract shared by every backend (and checked by one set of tests against each):
every write is committed before the method returns, because the runner persists a
change before it sends the matching event, so what a client has seen is in the
store; ``create`` raises AlreadyExists(reason="RUN_EXISTS") on a duplicate run id.
Messages are stored as serialized protobuf: the contract types are the schema.

Listing (``list_runs``) reads one tenant's runs newest first, by keyset (the last row's
creation time and run id, ``Cursor``), through an index per filter; each node's status
is kept in a column beside its outcome so a page's node counts are one grouped query.

Ownership: a store is opened for one ``owner`` (the executor replica's instance id).
A RUNNING run belongs to the replica whose lease on it has not expired; the owner
renews its leases, and another replica may ``claim`` a run once its lease expires.
Every write of a run's state is fenced on ownership: a replica that lost a run (it
stalled past its lease and another took over) gets ``LeaseLost`` instead of
overwriting the new owner's state.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from google.protobuf import json_format

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import timestamp
from trellis.runtime.errors import AlreadyExists, FailedPrecondition
from trellis_executor.store.sessions import (
    SessionCursor,
    SessionRecord,
    SessionRules,
    build_session_summary,
)

DEFAULT_OWNER = "local"
DEFAULT_LEASE_SECONDS = 15.0
#: Characters of a goal a run summary carries.
GOAL_PREFIX_CHARS = 120
#: ``store_meta`` row of the key that signs ListRuns page tokens: one key in the
#: database, so every replica sharing it accepts the others' tokens.
PAGE_TOKEN_KEY = "page_token_key"
#: ``store_meta`` row saying run_nodes.status was filled in for outcomes stored before
#: that column existed.
NODE_STATUS_FILLED = "node_status_filled"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def new_page_token_key() -> bytes:
    return secrets.token_bytes(32)


def session_page(
    records: Sequence[SessionRecord], turns: Mapping[str, list[executor_pb2.Run]]
) -> list[tuple[executor_pb2.SessionSummary, SessionCursor]]:
    """A ListSessions page: each session's summary (from its turns) and the cursor after it."""
    return [
        (
            build_session_summary(record, turns[record.session_id]),
            SessionCursor(to_micros(record.updated_at), record.session_id),
        )
        for record in records
    ]


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime, exactly."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: its last run's creation time (µs since the epoch) and id."""

    created_us: int
    run_id: str


@dataclass(frozen=True)
class RunQuery:
    """Which of a tenant's runs a list shows; zero values do not filter."""

    status: int = 0
    #: Created at or after (µs since the epoch).
    created_after_us: int | None = None
    #: Created before (µs since the epoch).
    created_before_us: int | None = None
    session_id: str = ""

    def where(
        self,
        tenant_id: str,
        cursor: Cursor | None,
        mark: Callable[[object], str],
        at: Callable[[int], object],
    ) -> str:
        """The WHERE clause over ``runs``: only the filters given, so each query can use
        the index that leads with them. ``mark(value)`` adds a parameter and returns its
        placeholder; ``at(micros)`` is a creation time as the backend stores it."""
        clauses = [f"tenant_id = {mark(tenant_id)}"]
        if self.status:
            clauses.append(f"status = {mark(self.status)}")
        if self.session_id:  # "<> ''" lets the partial index of session runs serve it
            clauses.append(f"session_id = {mark(self.session_id)} AND session_id <> ''")
        if self.created_after_us is not None:
            clauses.append(f"created_at >= {mark(at(self.created_after_us))}")
        if self.created_before_us is not None:
            clauses.append(f"created_at < {mark(at(self.created_before_us))}")
        if cursor is not None:
            moment = at(cursor.created_us)
            clauses.append(
                f"(created_at < {mark(moment)} OR (created_at = {mark(moment)}"
                f" AND run_id < {mark(cursor.run_id)}))"
            )
        return " AND ".join(clauses)


class LeaseLost(FailedPrecondition):
    """This replica no longer owns the run: another one took it over."""

    default_reason = "LEASE_LOST"


@dataclass(frozen=True)
class Progress:
    """Where a run's planning stands, saved at each step of a round for a resume."""

    #: The planning round under way (0 for the first plan).
    round: int = 0
    #: The round's plan is complete: what remains is running its nodes and the join.
    joining: bool = False
    #: How many nodes were stored before this round's plan began.
    round_start: int = 0
    #: Why the join asked for this round (empty for round 0).
    replan_reason: str = ""
    #: Model usage of the run so far.
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    #: Index (in planning order) of the first node of rounds 1, 2, ... (round 0 starts at 0).
    round_starts: tuple[int, ...] = ()
    #: The plan format the planner chose for the run (``common_pb2.PlanFormat``; 0 until
    #: the first plan started): every later Plan and Join of the run, a resumed one
    #: included, asks for the same.
    plan_format: int = 0

    def to_json(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "usage"}
        return json.dumps({**fields, "usage": json_format.MessageToDict(self.usage)})

    @classmethod
    def from_json(cls, text: str | None) -> Progress:
        if not text:
            return cls()
        fields = json.loads(text)
        usage = json_format.ParseDict(fields.pop("usage", {}), common_pb2.Usage())
        round_starts = tuple(fields.pop("round_starts", ()))
        return cls(**fields, usage=usage, round_starts=round_starts)


@dataclass(frozen=True)
class Resumable:
    """What a replica needs to continue a run it has claimed."""

    request: executor_pb2.RunRequest
    progress: Progress
    #: How many times the run was claimed after its creation.
    resumes: int
    #: The run's root span (hex), so the resumed work joins the run's trace.
    span_id: str


class RunStore(Protocol):
    owner: str
    #: Signs ListRuns page tokens; the same for every store opened on one database.
    page_token_key: bytes

    async def close(self) -> None: ...

    async def create(
        self,
        run_id: str,
        tenant_id: str,
        request: executor_pb2.RunRequest,
        trace_id: str,
        span_id: str = "",
        session_id: str = "",
        rules: SessionRules | None = None,
    ) -> None:
        """Record a new RUNNING run owned (leased) by this store's owner;
        AlreadyExists(reason="RUN_EXISTS") if the id is taken. With a ``session_id``
        the run is the session's next turn, admitted under ``rules`` in the same
        transaction: FailedPrecondition SESSION_BUSY / SESSION_FULL (``sessions.py``)."""
        ...

    async def get_session(
        self, tenant_id: str, session_id: str, ttl_seconds: float
    ) -> tuple[SessionRecord, list[executor_pb2.Run]] | None:
        """The tenant's live session and its turns (oldest first, with their nodes);
        None when there is none, it expired, or it belongs to another tenant."""
        ...

    async def list_sessions(
        self, tenant_id: str, ttl_seconds: float, cursor: SessionCursor | None, limit: int
    ) -> list[tuple[executor_pb2.SessionSummary, SessionCursor]]:
        """Up to ``limit`` of the tenant's live sessions, most recently active first."""
        ...

    async def save_summary(
        self, tenant_id: str, session_id: str, summary: str, through_turn: int
    ) -> None:
        """Store a context summary, unless one covering as many turns is stored."""
        ...

    async def delete_session(self, tenant_id: str, session_id: str, ttl_seconds: float) -> int:
        """Erase the content of the session's turns and its summary; the number of turns.
        NotFound is the caller's (-1 here); SESSION_BUSY while a turn runs."""
        ...

    async def add_nodes(
        self, run_id: str, first_seq: int, calls: Sequence[common_pb2.ToolCall]
    ) -> None:
        """Store planned nodes ``first_seq``, ``first_seq + 1``, ... in one write."""
        ...

    async def set_outcome(self, run_id: str, outcome: common_pb2.NodeOutcome) -> None: ...

    async def save_progress(self, run_id: str, progress: Progress) -> None: ...

    async def finish(self, run_id: str, finished: executor_pb2.RunFinished) -> None: ...

    async def get(self, run_id: str) -> executor_pb2.Run | None:
        """The stored run (plan in planning order), or None when there is no such run."""
        ...

    async def load(self, run_id: str) -> Resumable | None: ...

    async def list_runs(
        self, tenant_id: str, query: RunQuery, cursor: Cursor | None, limit: int
    ) -> list[tuple[executor_pb2.RunSummary, Cursor]]:
        """Up to ``limit`` of the tenant's runs matching ``query``, newest first (creation
        time, then run id, both descending), after ``cursor``; each with its own cursor."""
        ...

    async def renew(self, run_ids: Collection[str]) -> set[str]:
        """Extend the leases of ``run_ids``; returns those this owner still holds
        (finished ones included: a run that ends meanwhile is not a lost one)."""
        ...

    async def request_cancel(self, run_id: str) -> None:
        """Flag a RUNNING run for its owner (on whichever replica) to cancel."""
        ...

    async def cancel_requested(self, run_ids: Collection[str]) -> set[str]:
        """Those of ``run_ids`` that CancelRun flagged."""
        ...

    async def release(self, run_ids: Collection[str]) -> None:
        """End this owner's leases of ``run_ids`` now, for a peer to take them over."""
        ...

    async def claim(self, *, limit: int, run_id: str | None = None, own: bool = False) -> list[str]:
        """Take over RUNNING runs whose lease expired (and, with ``own``, runs already
        owned by this owner, as after a restart); only ``run_id`` when given.
        Returns the run ids now owned (their resume count incremented)."""
        ...


def run_exists(run_id: str) -> AlreadyExists:
    return AlreadyExists(f"run {run_id} exists", reason="RUN_EXISTS")


def lease_lost(run_id: str) -> LeaseLost:
    return LeaseLost(f"run {run_id} is owned by another executor now", metadata={"run_id": run_id})


def resumable(request: bytes, progress: str | None, resumes: int, span_id: str) -> Resumable:
    """One row of ``runs`` as what a resume needs; both backends share it."""
    return Resumable(
        executor_pb2.RunRequest.FromString(request), Progress.from_json(progress), resumes, span_id
    )


def build_run(
    run_id: str,
    tenant_id: str,
    goal: str,
    status: int,
    trace_id: str,
    created_at: datetime,
    finished_blob: bytes | None,
    finished_at: datetime | None,
    progress: str | None = None,
    session_id: str = "",
) -> executor_pb2.Run:
    """One row of ``runs`` as a Run message; both backends share it so they agree."""
    run = executor_pb2.Run(
        run_id=run_id,
        tenant_id=tenant_id,
        goal=goal,
        status=status,  # type: ignore[arg-type]
        trace_id=trace_id,
        created_at=timestamp(created_at),
        plan_format=Progress.from_json(progress).plan_format,  # type: ignore[arg-type]
        session_id=session_id,
    )
    if finished_blob:
        finished = executor_pb2.RunFinished.FromString(finished_blob)
        run.answer = finished.answer
        run.usage.CopyFrom(finished.usage)
        run.cost_nano_usd = finished.cost_nano_usd
        run.cache_hits = finished.cache_hits
        run.failed_nodes = finished.failed_nodes
        if finished.HasField("error"):
            run.error.CopyFrom(finished.error)
        if finished_at is not None:
            run.finished_at.CopyFrom(timestamp(finished_at))
    return run


def add_nodes(run: executor_pb2.Run, rows: list[tuple[bytes, bytes | None]]) -> executor_pb2.Run:
    """Append ``(call, outcome)`` blobs, already in ``seq`` order, to ``run``."""
    for call_blob, outcome_blob in rows:
        run.plan.append(common_pb2.ToolCall.FromString(call_blob))
        if outcome_blob:
            run.outcomes.append(common_pb2.NodeOutcome.FromString(outcome_blob))
    return run


#: Columns ``list_runs`` selects from ``runs``, in ``build_summary``'s order.
SUMMARY_COLUMNS = (
    f"run_id, substr(goal, 1, {GOAL_PREFIX_CHARS}), length(goal) > {GOAL_PREFIX_CHARS},"
    " status, trace_id, created_at, finished, finished_at, session_id"
)


def build_summary(
    run_id: str,
    goal: str,
    goal_truncated: bool,
    status: int,
    trace_id: str,
    created_at: datetime,
    finished_blob: bytes | None,
    finished_at: datetime | None,
    session_id: str,
) -> executor_pb2.RunSummary:
    """One row of ``SUMMARY_COLUMNS`` as a RunSummary (node counts are added apart)."""
    summary = executor_pb2.RunSummary(
        run_id=run_id,
        goal=goal,
        goal_truncated=bool(goal_truncated),
        status=status,  # type: ignore[arg-type]
        trace_id=trace_id,
        created_at=timestamp(created_at),
        session_id=session_id,
    )
    if finished_blob:
        finished = executor_pb2.RunFinished.FromString(finished_blob)
        summary.usage.CopyFrom(finished.usage)
        summary.cost_nano_usd = finished.cost_nano_usd
        summary.cache_hits = finished.cache_hits
        summary.failed_nodes = finished.failed_nodes
        summary.duration.CopyFrom(finished.duration)
        if finished.HasField("error"):
            summary.error.CopyFrom(finished.error)
        if finished_at is not None:
            summary.finished_at.CopyFrom(timestamp(finished_at))
    return summary


_COUNTED = {
    0: "pending",
    common_pb2.NODE_STATUS_SUCCEEDED: "succeeded",
    common_pb2.NODE_STATUS_FAILED: "failed",
    common_pb2.NODE_STATUS_SKIPPED: "skipped",
    common_pb2.NODE_STATUS_CANCELLED: "cancelled",
}


def add_node_counts(
    summaries: dict[str, executor_pb2.RunSummary], rows: list[tuple[str, int, int]]
) -> None:
    """``(run_id, node status, count)`` rows (status 0: no outcome yet) into the summaries."""
    for run_id, status, count in rows:
        nodes = summaries[run_id].nodes
        nodes.total += count
        name = _COUNTED.get(status, "pending")
        setattr(nodes, name, getattr(nodes, name) + count)


def outcome_status(blob: bytes) -> int:
    """The node status a stored outcome holds (to fill run_nodes.status of old rows)."""
    return int(common_pb2.NodeOutcome.FromString(blob).status)
