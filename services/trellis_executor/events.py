"""The run's event stream: each event is persisted, then queued for every subscriber.

Usually one subscriber (the client that started the run); a second Run with the same
run_id, or a ResumeRun, subscribes too and first gets the run's history. A run that
this replica resumed starts its history from the store. When the run is lost to
another replica (its lease expired), writes stop and subscribers are told.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import TrellisError
from trellis_executor.scheduler import SchedulerEvents
from trellis_executor.store import LeaseLost, Progress, RunStore

#: Marks the end of the stream in the queue.
END = None

Queue = asyncio.Queue[executor_pb2.RunResponse | None]


class RunEvents(SchedulerEvents):
    """Store first, client second: a client never sees state the store lacks."""

    def __init__(
        self,
        run_id: str,
        store: RunStore,
        *,
        history: Iterable[executor_pb2.RunResponse] = (),
        retried: Iterable[str] = (),
    ) -> None:
        self.run_id = run_id
        self._store = store
        self._history = list(history)
        self._seq = sum(1 for e in self._history if e.HasField("node_planned"))
        self._retried = set(retried)
        self._subscribers: list[Queue] = []
        self.ended = False
        #: Another replica owns the run now: nothing more is written or sent from here.
        self.lost = False
        #: Why the run was refused midway (an invalid streamed node): after ``finished``,
        #: the stream ends with this error as its status.
        self.rejection: TrellisError | None = None

    def subscribe(self) -> Queue:
        """A queue of the run's events so far and from now on, ending with ``END``."""
        queue: Queue = asyncio.Queue()
        for event in self._history:
            queue.put_nowait(event)
        if self.ended:
            queue.put_nowait(END)
        else:
            self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: Queue) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def lose(self) -> None:
        """The lease is gone: stop writing, and end every subscriber's stream."""
        self.lost = True
        self._end()

    async def _write(self, write: Awaitable[None]) -> bool:
        """Persist one change; False (and nothing written) once the run is lost."""
        if self.lost:
            write.close()  # type: ignore[attr-defined]
            return False
        try:
            await write
        except LeaseLost:
            self.lose()
            raise
        return True

    def _send(self, **event: object) -> None:
        response = executor_pb2.RunResponse(run_id=self.run_id, **event)  # type: ignore[arg-type]
        self._history.append(response)
        for queue in self._subscribers:
            queue.put_nowait(response)

    def close(self) -> None:
        """The run's task is over: end the subscribers' streams (if ``finished`` did not)."""
        if not self.ended:
            self._end()

    def _end(self) -> None:
        self.ended = True
        for queue in self._subscribers:
            queue.put_nowait(END)
        self._subscribers.clear()

    async def planned(self, *calls: common_pb2.ToolCall) -> None:
        if await self._write(self._store.add_nodes(self.run_id, self._seq + 1, calls)):
            self._seq += len(calls)
            for call in calls:
                self._send(node_planned=executor_pb2.NodePlanned(call=call))

    async def started(self, node_id: str) -> None:
        if not self.lost:
            attempt = 2 if node_id in self._retried else 1
            self._send(node_started=executor_pb2.NodeStarted(node_id=node_id, attempt=attempt))

    async def finished(self, outcome: common_pb2.NodeOutcome) -> None:
        if await self._write(self._store.set_outcome(self.run_id, outcome)):
            self._send(node_finished=executor_pb2.NodeFinished(outcome=outcome))

    async def progress(self, progress: Progress) -> None:
        await self._write(self._store.save_progress(self.run_id, progress))

    def answer(self, text: str) -> None:
        if not self.lost:
            self._send(answer_delta=executor_pb2.AnswerDelta(text=text))

    async def run_finished(self, finished: executor_pb2.RunFinished) -> None:
        if await self._write(self._store.finish(self.run_id, finished)):
            self._send(finished=finished)
            self._end()
