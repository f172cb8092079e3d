"""A run's event stream read back from the store.

For a run this replica does not execute: a finished run is replayed, and a run that
another replica owns is followed by polling the store until it finishes — so a
client that reconnects (Run with the same run_id, or ResumeRun) to any replica sees
the run through, wherever it executes. Answer tokens are not stored one by one; the
final answer arrives in ``finished``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import duration, timestamp_seconds
from trellis_executor.store import RunStore

RUNNING = executor_pb2.RUN_STATUS_RUNNING


class StoredEvents:
    """Turns successive snapshots of one stored run into the events not yet given."""

    def __init__(self) -> None:
        self._planned = 0
        self._finished: set[str] = set()

    def new(self, run: executor_pb2.Run) -> Iterator[executor_pb2.RunResponse]:
        for call in run.plan[self._planned :]:
            yield executor_pb2.RunResponse(
                run_id=run.run_id, node_planned=executor_pb2.NodePlanned(call=call)
            )
        self._planned = len(run.plan)
        for outcome in run.outcomes:
            if outcome.node_id not in self._finished:
                self._finished.add(outcome.node_id)
                yield executor_pb2.RunResponse(
                    run_id=run.run_id, node_finished=executor_pb2.NodeFinished(outcome=outcome)
                )


async def follow_stored(
    store: RunStore, run: executor_pb2.Run, *, poll_seconds: float
) -> AsyncIterator[executor_pb2.RunResponse]:
    """``started``, the stored events, new ones as they are stored, then ``finished``."""
    yield executor_pb2.RunResponse(
        run_id=run.run_id, started=executor_pb2.RunStarted(trace_id=run.trace_id)
    )
    events = StoredEvents()
    while True:
        for event in events.new(run):
            yield event
        if run.status != RUNNING:
            yield executor_pb2.RunResponse(run_id=run.run_id, finished=stored_finished(run))
            return
        await asyncio.sleep(poll_seconds)
        latest = await store.get(run.run_id)
        if latest is None:  # pragma: no cover - runs are never deleted
            return
        run = latest


def stored_finished(run: executor_pb2.Run) -> executor_pb2.RunFinished:
    """A finished run's ``finished`` event, rebuilt from its stored state."""
    finished = executor_pb2.RunFinished(
        status=run.status,
        answer=run.answer,
        usage=run.usage,
        cost_nano_usd=run.cost_nano_usd,
        cache_hits=run.cache_hits,
        failed_nodes=run.failed_nodes,
        duration=duration(
            max(0.0, timestamp_seconds(run.finished_at) - timestamp_seconds(run.created_at))
        ),
    )
    if run.HasField("error"):
        finished.error.CopyFrom(run.error)
    return finished
