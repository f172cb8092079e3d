"""What the runner needs from a run store, whichever database holds it.

Contract shared by every backend (and checked by one set of tests against each):
every write is committed before the method returns, because the runner persists a
change before it sends the matching event, so what a client has seen is in the
store; ``create`` raises AlreadyExists(reason="RUN_EXISTS") on a duplicate run id.
Messages are stored as serialized protobuf: the contract types are the schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import timestamp
from trellis.runtime.errors import AlreadyExists


class RunStore(Protocol):
    async def close(self) -> None: ...

    async def create(
        self, run_id: str, tenant_id: str, request: executor_pb2.RunRequest, trace_id: str
    ) -> None:
        """Record a new RUNNING run; AlreadyExists(reason="RUN_EXISTS") if the id is taken."""
        ...

    async def add_node(self, run_id: str, seq: int, call: common_pb2.ToolCall) -> None: ...

    async def set_outcome(self, run_id: str, outcome: common_pb2.NodeOutcome) -> None: ...

    async def finish(self, run_id: str, finished: executor_pb2.RunFinished) -> None: ...

    async def get(self, run_id: str) -> executor_pb2.Run | None:
        """The stored run (plan in planning order), or None when there is no such run."""
        ...


def run_exists(run_id: str) -> AlreadyExists:
    return AlreadyExists(f"run {run_id} exists", reason="RUN_EXISTS")


def build_run(
    run_id: str,
    tenant_id: str,
    goal: str,
    status: int,
    trace_id: str,
    created_at: datetime,
    finished_blob: bytes | None,
    finished_at: datetime | None,
) -> executor_pb2.Run:
    """One row of ``runs`` as a Run message; both backends share it so they agree."""
    run = executor_pb2.Run(
        run_id=run_id,
        tenant_id=tenant_id,
        goal=goal,
        status=status,  # type: ignore[arg-type]
        trace_id=trace_id,
        created_at=timestamp(created_at),
    )
    if finished_blob:
        finished = executor_pb2.RunFinished.FromString(finished_blob)
        run.answer = finished.answer
        run.usage.CopyFrom(finished.usage)
        run.cost_nano_usd = finished.cost_nano_usd
        run.cache_hits = finished.cache_hits
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
