"""DagScheduler: dispatch-as-ready, streaming admission, skips, references, limits."""

import asyncio
import time
from collections.abc import AsyncIterator

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_struct, to_struct, to_value
from trellis_executor.plan import NodeChecker
from trellis_executor.scheduler import DagScheduler, SchedulerEvents

OK = common_pb2.NODE_STATUS_SUCCEEDED


def call(node_id: str, ms: int = 0, deps=(), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        node_id=node_id, tool="sleep", args=to_struct({"ms": ms, **args}), depends_on=deps
    )


class Recorder(SchedulerEvents):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, float]] = []

    async def planned(self, c: common_pb2.ToolCall) -> None:
        self.log.append(("planned", c.node_id, time.monotonic()))

    async def started(self, node_id: str) -> None:
        self.log.append(("started", node_id, time.monotonic()))

    async def finished(self, outcome: common_pb2.NodeOutcome) -> None:
        self.log.append(("finished", outcome.node_id, time.monotonic()))

    def at(self, kind: str, node_id: str) -> float:
        return next(t for k, n, t in self.log if k == kind and n == node_id)


class FakeTools:
    """Sleeps ``ms``; fails when args has fail=true; records resolved args."""

    def __init__(self) -> None:
        self.args: dict[str, dict] = {}
        self.running = 0
        self.peak = 0

    async def __call__(self, c: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        args = from_struct(c.args)
        self.args[c.node_id] = args
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(args["ms"] / 1000)
        finally:
            self.running -= 1
        if args.get("fail"):
            return common_pb2.NodeOutcome(node_id=c.node_id, status=common_pb2.NODE_STATUS_FAILED)
        return common_pb2.NodeOutcome(
            node_id=c.node_id, status=OK, output=to_value({"id": c.node_id, "ms": args["ms"]})
        )


async def feed(calls, gaps_ms: int = 0) -> AsyncIterator[common_pb2.ToolCall]:
    for c in calls:
        if gaps_ms:
            await asyncio.sleep(gaps_ms / 1000)
        yield c


def checker() -> NodeChecker:
    return NodeChecker(["sleep"], max_nodes=100)


async def test_fast_chain_does_not_wait_for_slow_sibling() -> None:
    # slow (300 ms) beside a chain a -> b -> c of 50 ms each: no superstep barrier,
    # so c finishes long before slow does.
    tools, events = FakeTools(), Recorder()
    plan = [call("slow", 300), call("a", 50), call("b", 50, ["a"]), call("c", 50, ["b"])]
    await DagScheduler(tools, events, max_parallel=8).run(feed(plan), checker())
    assert events.at("started", "b") >= events.at("finished", "a")
    assert events.at("finished", "c") < events.at("finished", "slow")


async def test_nodes_start_while_plan_is_still_streaming() -> None:
    tools, events = FakeTools(), Recorder()
    plan = [call("a", 10), call("b", 10), call("c", 10)]
    await DagScheduler(tools, events, max_parallel=8).run(feed(plan, gaps_ms=100), checker())
    assert events.at("finished", "a") < events.at("planned", "c")


async def test_dependents_of_failure_are_skipped_independent_branch_runs() -> None:
    tools, events = FakeTools(), Recorder()
    plan = [
        call("bad", 0, fail=True),
        call("dep", 0, ["bad"]),
        call("dep2", 0, ["dep"]),
        call("free", 0),
    ]
    scheduler = DagScheduler(tools, events, max_parallel=8)
    await scheduler.run(feed(plan), checker())
    statuses = {k: common_pb2.NodeStatus.Name(v.status) for k, v in scheduler.outcomes.items()}
    assert statuses == {
        "bad": "NODE_STATUS_FAILED",
        "dep": "NODE_STATUS_SKIPPED",
        "dep2": "NODE_STATUS_SKIPPED",
        "free": "NODE_STATUS_SUCCEEDED",
    }
    assert "dep" not in tools.args and "dep2" not in tools.args
    assert scheduler.outcomes["dep"].error.code == "DEPENDENCY_FAILED"


async def test_references_are_resolved_from_dependency_outputs() -> None:
    tools = FakeTools()
    plan = [call("a", 0), call("b", 0, ["a"], got="${a.id}", whole="$a")]
    await DagScheduler(tools, Recorder(), max_parallel=8).run(feed(plan), checker())
    assert tools.args["b"]["got"] == "a"
    assert tools.args["b"]["whole"] == {"id": "a", "ms": 0}


async def test_max_parallel_bounds_concurrency() -> None:
    tools = FakeTools()
    plan = [call(f"n{i}", 20) for i in range(6)]
    await DagScheduler(tools, Recorder(), max_parallel=2).run(feed(plan), checker())
    assert tools.peak == 2


async def test_cancelling_marks_in_flight_nodes_cancelled() -> None:
    tools, events = FakeTools(), Recorder()
    scheduler = DagScheduler(tools, events, max_parallel=8)
    task = asyncio.create_task(scheduler.run(feed([call("long", 5000)]), checker()))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert scheduler.outcomes["long"].status == common_pb2.NODE_STATUS_CANCELLED


async def test_a_stop_before_ready_nodes_ran_records_them_cancelled() -> None:
    """A plan that fails right after a valid node (the model's next line is broken): the
    node's task never ran, and it still reports how it ended, as does one queued for a slot."""

    async def broken_after_two() -> AsyncIterator[common_pb2.ToolCall]:
        yield call("first", 1000)
        yield call("queued", 0)
        raise ValueError("the model's next line is broken")

    tools, events = FakeTools(), Recorder()
    scheduler = DagScheduler(tools, events, max_parallel=1)
    [error] = await asyncio.gather(
        scheduler.run(broken_after_two(), checker()), return_exceptions=True
    )
    assert isinstance(error, BaseExceptionGroup)
    assert {n: o.status for n, o in scheduler.outcomes.items()} == {
        "first": common_pb2.NODE_STATUS_CANCELLED,
        "queued": common_pb2.NODE_STATUS_CANCELLED,
    }
    assert scheduler.outcomes["queued"].error.message == "the run stopped before the node started"
    assert [n for k, n, _ in events.log if k == "finished"].count("queued") == 1
