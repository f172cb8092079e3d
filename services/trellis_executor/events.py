"""The run's event stream: each event is persisted, then queued for the client."""

from __future__ import annotations

import asyncio

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis_executor.scheduler import SchedulerEvents
from trellis_executor.store import RunStore

#: Marks the end of the stream in the queue.
END = None


class RunEvents(SchedulerEvents):
    """Store first, client second: a client never sees state the store lacks."""

    def __init__(self, run_id: str, store: RunStore) -> None:
        self.run_id = run_id
        self.queue: asyncio.Queue[executor_pb2.RunResponse | None] = asyncio.Queue()
        self._store = store
        self._seq = 0

    def _send(self, **event: object) -> None:
        self.queue.put_nowait(executor_pb2.RunResponse(run_id=self.run_id, **event))  # type: ignore[arg-type]

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
        self.queue.put_nowait(END)
