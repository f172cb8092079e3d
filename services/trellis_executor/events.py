"""The run's event stream: each event is persisted, then queued for every subscriber.

Usually one subscriber (the client that started the run); a second Run with the same
run_id, or a ResumeRun, subscribes too and first gets the run's history. A run that
this replica resumed starts its history from the store. When the run is lost to
another replica (its lease expired), writes stop and subscribers are told.

A write is issued at once and the caller need not wait for it (the scheduler starts a
node's dependents while its outcome is being stored), yet subscribers get the events in
the order they happened and each only once its write is committed: events wait in
``_unsent`` behind the writes issued before them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import TrellisError
from trellis_executor.scheduler import SchedulerEvents
from trellis_executor.store import LeaseLost, Progress, RunStore

#: Marks the end of the stream in the queue.
END = None

Queue = asyncio.Queue[executor_pb2.RunResponse | None]


@dataclass
class _Unsent:
    """Events waiting for their write (None: nothing to store) and those before them."""

    write: asyncio.Future[None] | None
    events: list[executor_pb2.RunResponse]
    #: The run's last event: the streams end after it.
    end: bool = False


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
        self._unsent: deque[_Unsent] = deque()
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

    def _store_then_send(
        self,
        write: Coroutine[Any, Any, None],
        *events: executor_pb2.RunResponse,
        end: bool = False,
    ) -> asyncio.Future[None]:
        """Issue ``write`` now; ``events`` go out once it is committed and everything
        issued before them went out. The future is the write (``LeaseLost`` when the
        run moved: then nothing more is written or sent from here)."""
        if self.lost:
            write.close()  # the run moved: nothing more is written from here
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        task = asyncio.ensure_future(write)
        self._unsent.append(_Unsent(task, list(events), end))
        task.add_done_callback(self._written)
        return task

    def _send(self, *events: executor_pb2.RunResponse) -> None:
        """Send ``events`` (nothing to store) after every write issued before them."""
        self._unsent.append(_Unsent(None, list(events)))
        self._pump()

    def _written(self, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and isinstance(write.exception(), LeaseLost):
            self.lose()
        self._pump()

    def _pump(self) -> None:
        """Send the events whose writes (and all writes before them) are done."""
        while self._unsent:
            head = self._unsent[0]
            if head.write is not None and not head.write.done():
                return
            self._unsent.popleft()
            if self.lost or (
                head.write is not None
                and (head.write.cancelled() or head.write.exception() is not None)
            ):
                continue  # not stored: never shown
            for response in head.events:
                self._history.append(response)
                for queue in self._subscribers:
                    queue.put_nowait(response)
            if head.end:
                self._end()

    def _event(self, **event: object) -> executor_pb2.RunResponse:
        return executor_pb2.RunResponse(run_id=self.run_id, **event)  # type: ignore[arg-type]

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
        first, self._seq = self._seq + 1, self._seq + len(calls)
        await self._store_then_send(
            self._store.add_nodes(self.run_id, first, calls),
            *(self._event(node_planned=executor_pb2.NodePlanned(call=call)) for call in calls),
        )

    async def started(self, node_id: str) -> None:
        attempt = 2 if node_id in self._retried else 1
        started = executor_pb2.NodeStarted(node_id=node_id, attempt=attempt)
        self._send(self._event(node_started=started))

    def finished(self, outcome: common_pb2.NodeOutcome) -> asyncio.Future[None]:
        """Issued at once; awaiting it waits for the write (see the module docstring)."""
        return self._store_then_send(
            self._store.set_outcome(self.run_id, outcome),
            self._event(node_finished=executor_pb2.NodeFinished(outcome=outcome)),
        )

    async def progress(self, progress: Progress) -> None:
        await self._store_then_send(self._store.save_progress(self.run_id, progress))

    def answer(self, text: str) -> None:
        self._send(self._event(answer_delta=executor_pb2.AnswerDelta(text=text)))

    async def run_finished(self, finished: executor_pb2.RunFinished) -> None:
        await self._store_then_send(
            self._store.finish(self.run_id, finished), self._event(finished=finished), end=True
        )
