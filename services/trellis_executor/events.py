"""The run's event stream: each event is persisted, then queued for every subscriber;
and a finished run's stream replayed from the store.

Usually one subscriber (the client that started the run); a second Run with the same
run_id subscribes too and sees the events from then on (RunRequest.run_id idempotency).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import duration, timestamp_seconds
from trellis_executor.scheduler import SchedulerEvents
from trellis_executor.store import RunStore

#: Marks the end of the stream in the queue.
END = None


class RunEvents(SchedulerEvents):
    """Store first, client second: a client never sees state the store lacks."""

    def __init__(self, run_id: str, store: RunStore) -> None:
        self.run_id = run_id
        self._subscribers: list[asyncio.Queue[executor_pb2.RunResponse | None]] = []
        self._store = store
        self._seq = 0
        self._ended = False

    def subscribe(self) -> asyncio.Queue[executor_pb2.RunResponse | None]:
        """A queue of the events from now on, ending with ``END`` (at once if already ended)."""
        queue: asyncio.Queue[executor_pb2.RunResponse | None] = asyncio.Queue()
        if self._ended:
            queue.put_nowait(END)
        else:
            self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[executor_pb2.RunResponse | None]) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _send(self, **event: object) -> None:
        response = executor_pb2.RunResponse(run_id=self.run_id, **event)  # type: ignore[arg-type]
        for queue in self._subscribers:
            queue.put_nowait(response)

    async def planned(self, call: common_pb2.ToolCall) -> None:
        self._seq += 1
        await self._store.add_node(self.run_id, self._seq, call)
        self._send(node_planned=executor_pb2.NodePlanned(call=call))

    async def started(self, node_id: str) -> None:
        self._send(node_started=executor_pb2.NodeStarted(node_id=node_id, attempt=1))

    async def finished(self, outcome: common_pb2.NodeOutcome) -> None:
        await self._store.set_outcome(self.run_id, outcome)
        self._send(node_finished=executor_pb2.NodeFinished(outcome=outcome))

    def answer(self, text: str) -> None:
        self._send(answer_delta=executor_pb2.AnswerDelta(text=text))

    async def run_finished(self, finished: executor_pb2.RunFinished) -> None:
        await self._store.finish(self.run_id, finished)
        self._send(finished=finished)
        self._ended = True
        for queue in self._subscribers:
            queue.put_nowait(END)


async def replay(run: executor_pb2.Run) -> AsyncIterator[executor_pb2.RunResponse]:
    """A finished run's stream from the store: ``started``, each outcome, ``finished``."""
    yield executor_pb2.RunResponse(
        run_id=run.run_id, started=executor_pb2.RunStarted(trace_id=run.trace_id)
    )
    for outcome in run.outcomes:
        yield executor_pb2.RunResponse(
            run_id=run.run_id, node_finished=executor_pb2.NodeFinished(outcome=outcome)
        )
    finished = executor_pb2.RunFinished(
        status=run.status,
        answer=run.answer,
        usage=run.usage,
        cost_nano_usd=run.cost_nano_usd,
        cache_hits=run.cache_hits,
        duration=duration(
            max(0.0, timestamp_seconds(run.finished_at) - timestamp_seconds(run.created_at))
        ),
    )
    if run.HasField("error"):
        finished.error.CopyFrom(run.error)
    yield executor_pb2.RunResponse(run_id=run.run_id, finished=finished)
