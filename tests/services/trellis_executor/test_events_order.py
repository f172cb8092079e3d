"""A node's dependents start while its outcome is being stored, yet the client sees
every event in order and each only once its write is committed (``RunEvents``)."""

from __future__ import annotations

import asyncio

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis_executor.events import END, RunEvents
from trellis_executor.plan import NodeChecker
from trellis_executor.scheduler import DagScheduler
from trellis_executor.store import LeaseLost

OK = common_pb2.NODE_STATUS_SUCCEEDED


class SlowStore:
    """Writes one at a time in the order issued, as the real stores do (one SQLite
    connection, PostgreSQL's group commit); the outcome write of a node in ``held``
    waits for ``release``."""

    def __init__(self, *held: str) -> None:
        self.one_at_a_time = asyncio.Lock()
        self.held = set(held)
        self.release = asyncio.Event()
        self.writes: list[str] = []
        self.lease_lost = False

    async def add_nodes(self, run_id: str, first_seq: int, calls) -> None:
        self.writes.append("planned " + ",".join(c.node_id for c in calls))

    async def set_outcome(self, run_id: str, outcome: common_pb2.NodeOutcome) -> None:
        async with self.one_at_a_time:
            if outcome.node_id in self.held:
                await self.release.wait()
            if self.lease_lost:
                raise LeaseLost(run_id)
            self.writes.append("outcome " + outcome.node_id)

    async def finish(self, run_id: str, finished: executor_pb2.RunFinished) -> None:
        self.writes.append("finished")


def call(node_id: str, *deps: str) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool="echo", depends_on=list(deps))


def drained(queue: asyncio.Queue) -> list[str]:
    seen = []
    while not queue.empty():
        event = queue.get_nowait()
        if event is END:
            seen.append("END")
            continue
        kind = event.WhichOneof("event")
        if kind == "node_planned":
            node = event.node_planned.call.node_id
        elif kind == "node_started":
            node = event.node_started.node_id
        elif kind == "node_finished":
            node = event.node_finished.outcome.node_id
        else:
            node = ""
        seen.append(f"{kind} {node}".strip())
    return seen


async def test_a_dependent_starts_while_the_outcome_before_it_is_stored() -> None:
    store = SlowStore("a")
    events = RunEvents("run-1", store)  # type: ignore[arg-type]
    client = events.subscribe()
    ran: list[str] = []

    async def run_node(c: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        ran.append(c.node_id)
        return common_pb2.NodeOutcome(node_id=c.node_id, status=OK)

    scheduler = DagScheduler(run_node, events, max_parallel=4)
    running = asyncio.create_task(scheduler.run_plan([call("a"), call("b", "a")]))
    for _ in range(50):
        await asyncio.sleep(0)
    # b ran, though a's outcome is not stored yet ...
    assert ran == ["a", "b"]
    assert "outcome a" not in store.writes
    # ... and the client has seen nothing a's write has not covered
    assert drained(client) == ["node_planned a", "node_planned b", "node_started a"]
    assert not running.done()  # the scheduler waits for the write before it returns

    store.release.set()
    await asyncio.wait_for(running, 5)
    assert store.writes == ["planned a,b", "outcome a", "outcome b"]
    assert drained(client) == ["node_finished a", "node_started b", "node_finished b"]

    await events.run_finished(executor_pb2.RunFinished(status=executor_pb2.RUN_STATUS_SUCCEEDED))
    assert drained(client) == ["finished", "END"]


async def test_an_event_whose_write_failed_is_never_shown() -> None:
    store = SlowStore("a")
    store.lease_lost = True
    store.release.set()
    events = RunEvents("run-1", store)  # type: ignore[arg-type]
    client = events.subscribe()
    written = events.finished(common_pb2.NodeOutcome(node_id="a", status=OK))
    events.answer("after it")  # queued behind the write
    try:
        await written
    except LeaseLost:
        pass
    else:
        raise AssertionError("the write's failure reaches whoever awaits it")
    assert events.lost
    assert drained(client) == ["END"]  # the run moved: nothing of it is shown from here


async def test_a_streamed_node_starts_only_once_its_planned_write_is_stored() -> None:
    store = SlowStore()
    gate = asyncio.Event()
    original = store.add_nodes

    async def slow_add_nodes(run_id: str, first_seq: int, calls) -> None:
        await gate.wait()
        await original(run_id, first_seq, calls)

    store.add_nodes = slow_add_nodes  # type: ignore[method-assign]
    events = RunEvents("run-1", store)  # type: ignore[arg-type]
    ran: list[str] = []

    async def run_node(c: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        ran.append(c.node_id)
        return common_pb2.NodeOutcome(node_id=c.node_id, status=OK)

    async def plan():
        yield call("a")

    scheduler = DagScheduler(run_node, events, max_parallel=4)
    running = asyncio.create_task(scheduler.run(plan(), NodeChecker(["echo"], 10)))
    await asyncio.sleep(0.05)
    assert ran == []  # a planner's node is stored before it runs (a crash must know it)
    gate.set()
    await asyncio.wait_for(running, 5)
    assert ran == ["a"]
