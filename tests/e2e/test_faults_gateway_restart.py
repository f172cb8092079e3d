"""Faults: the tool gateway restarted mid-run, with its idempotency keys in Redis.

The five services run as processes (``process_stack``); the gateway keeps the keys of
side-effecting calls in a private ``redis-server`` (``TRELLIS_REDIS_URL``) with a 2 s
lease. The tools are HTTP endpoints served by this test that record every request when
it arrives and answer a few seconds later, so calls can be caught in flight:
``effect`` (POST, side effects) and ``probe`` (GET, no side effects, never cached).

1. The gateway is SIGKILLed while a side-effecting call and a plain call are in
   flight, then started again on its port. The executor dispatches both again (the
   gateway was UNAVAILABLE) within the run's deadline: the plain call simply runs
   again and succeeds; the side-effecting one is *not* run again - its first attempt
   reached the endpoint, its outcome died with the gateway - and its node fails
   ``IDEMPOTENCY_UNKNOWN`` once the dead gateway's lease runs out (the documented
   at-most-once rule). Nodes dispatched after the restart run normally; the run
   ends FAILED naming n1 (an explicit plan with a failed node) and no effect ever
   happens twice.
2. The executor is SIGKILLed while a side-effecting call is in flight; the gateway
   finishes it (its caller left) and stores its outcome in Redis, then the gateway is
   SIGKILLed and restarted too - its memory is gone. The restarted executor resumes the
   run and dispatches the node again with the same key: the new gateway answers with
   the stored first outcome; the endpoint saw one request.

The executor's part - dispatching a node again while the gateway cannot be reached,
with backoff, within the run's deadline, and only for that - is also checked without
processes, on the scheduler alone.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
import yaml
from aiohttp import web

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime import context
from trellis.runtime.convert import duration, from_value, to_struct
from trellis_executor.scheduler import REDISPATCH_BACKOFF, DagScheduler, SchedulerEvents, ended

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
RUN_FAILED = executor_pb2.RUN_STATUS_FAILED
NODE_SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
NODE_FAILED = common_pb2.NODE_STATUS_FAILED
LEASE_SECONDS = 2.0
RUN_TIMEOUT = 60.0


@dataclass
class Endpoints:
    """``POST /effect`` (a side effect per request) and ``GET /probe`` (none)."""

    port: int = 0
    #: Seconds each answer takes, after the request is recorded.
    delay: dict[str, float] = field(default_factory=lambda: {"effect": 4.0, "probe": 2.0})
    #: (tool, node) of every request, in order of arrival.
    calls: list[tuple[str, str]] = field(default_factory=list)
    first_answer: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[tuple[str, str, str], asyncio.Event] = field(default_factory=dict)

    def event(self, what: str, tool: str, node: str) -> asyncio.Event:
        """``what`` = "arrived" or "answered"."""
        return self.events.setdefault((what, tool, node), asyncio.Event())

    def count(self, tool: str, node: str) -> int:
        return self.calls.count((tool, node))

    async def _handle(self, tool: str, node: str) -> web.Response:
        self.calls.append((tool, node))
        answer = {"tool": tool, "node": node, "request": len(self.calls)}
        self.first_answer.setdefault(node, answer)
        self.event("arrived", tool, node).set()
        await asyncio.sleep(self.delay[tool])
        self.event("answered", tool, node).set()
        return web.json_response(answer)

    async def effect(self, request: web.Request) -> web.Response:
        return await self._handle("effect", str((await request.json())["node"]))

    async def probe(self, request: web.Request) -> web.Response:
        return await self._handle("probe", request.query["node"])


@pytest.fixture
async def endpoints(http_app) -> Endpoints:
    server = Endpoints()
    app = web.Application()
    app.router.add_post("/effect", server.effect)
    app.router.add_get("/probe", server.probe)
    server.port = await http_app(app)
    return server


def tools_file(path: Path, endpoints: Endpoints) -> Path:
    schema = {
        "type": "object",
        "properties": {"node": {"type": "string"}},
        "required": ["node"],
        "additionalProperties": False,
    }
    base = f"http://127.0.0.1:{endpoints.port}"
    common = {"kind": "http", "allowed_hosts": ["127.0.0.1"], "body_args": ["node"],
              "timeout": 10, "input_schema": schema}  # fmt: skip
    tools = [
        {"name": "effect", "description": "One side effect per request (test tool).",
         "method": "POST", "url": f"{base}/effect", "side_effects": True, **common},
        {"name": "probe", "description": "Reads; no side effects, never cached (test tool).",
         "method": "GET", "url": f"{base}/probe", "cache_ttl": 0, **common},
    ]  # fmt: skip
    path.write_text(yaml.safe_dump({"version": 1, "tools": tools}, sort_keys=False))
    return path


def node(node_id: str, tool: str, *deps: str) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        node_id=node_id, tool=tool, args=to_struct({"node": node_id}), depends_on=deps
    )


async def start_stack(process_stack, tmp_path: Path, endpoints: Endpoints, redis_url: str):
    return await process_stack(
        per_service={
            "toolgateway": {
                "TRELLIS_TOOLS_FILE": str(tools_file(tmp_path / "tools.yaml", endpoints)),
                "TRELLIS_TOOLS_RELOAD_SECONDS": "0",
                "TRELLIS_REDIS_URL": redis_url,
                "TRELLIS_IDEMPOTENCY_LEASE_SECONDS": str(LEASE_SECONDS),
            }
        },
    )


def kinds(events: list[executor_pb2.RunResponse]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def show(stack, endpoints: Endpoints) -> None:
    print(f"endpoint requests (in order): {endpoints.calls}")
    for name in ("toolgateway", "executor"):
        print(f"----- {name} -----\n{stack.processes[name].output()}")


async def test_a_gateway_killed_mid_call_reruns_plain_calls_and_never_repeats_an_effect(
    process_stack, redis_server, endpoints: Endpoints, tmp_path: Path, channels
) -> None:
    stack = await start_stack(process_stack, tmp_path, endpoints, redis_server.url)
    try:
        executor = executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))
        run_id = f"gw-restart-{uuid.uuid4().hex[:10]}"
        plan = [
            node("n1", "effect"),  # in flight at the kill: side effects
            node("n2", "probe"),  # in flight at the kill: no side effects
            node("n3", "probe", "n2"),  # dispatched after the restart
            node("n4", "effect", "n2"),  # a side effect dispatched after the restart
        ]
        started = time.monotonic()
        call = executor.Run(
            executor_pb2.RunRequest(
                run_id=run_id,
                plan=plan,
                options=executor_pb2.RunOptions(timeout=duration(RUN_TIMEOUT)),
            ),
            timeout=RUN_TIMEOUT + 10,
        )
        events: list[executor_pb2.RunResponse] = []

        async def read_all() -> None:
            async for event in call:
                events.append(event)

        reader = asyncio.create_task(read_all())
        for tool, node_id in (("effect", "n1"), ("probe", "n2")):
            await asyncio.wait_for(endpoints.event("arrived", tool, node_id).wait(), 15)
        stack.processes["toolgateway"].kill()  # both calls in flight; their outcomes die
        killed = time.monotonic()
        await stack.restart("toolgateway")
        restarted = time.monotonic()
        await asyncio.wait_for(reader, RUN_TIMEOUT)
        finished_at = time.monotonic()

        assert events and events[-1].HasField("finished"), kinds(events)
        finished = events[-1].finished
        # n1 failed (below): an explicit plan with a failed node fails, naming it
        assert (finished.status, finished.failed_nodes) == (RUN_FAILED, 1), finished
        assert (finished.error.code, finished.error.details["node_id"]) == (
            "IDEMPOTENCY_UNKNOWN",
            "n1",
        )
        outcomes = {
            e.node_finished.outcome.node_id: e.node_finished.outcome
            for e in events
            if e.HasField("node_finished")
        }
        assert sorted(outcomes) == ["n1", "n2", "n3", "n4"]
        # n1: its first attempt reached the endpoint; at most once means not again.
        n1 = outcomes["n1"]
        assert (n1.status, n1.error.code, n1.error.retryable) == (
            NODE_FAILED,
            "IDEMPOTENCY_UNKNOWN",
            False,
        ), n1
        assert endpoints.count("effect", "n1") == 1
        # n2 ran again on the new gateway, and its dependents ran after it.
        for node_id in ("n2", "n3", "n4"):
            assert outcomes[node_id].status == NODE_SUCCEEDED, outcomes[node_id]
        assert endpoints.count("probe", "n2") == 2
        assert (endpoints.count("probe", "n3"), endpoints.count("effect", "n4")) == (1, 1)
        assert from_value(outcomes["n4"].output) == endpoints.first_answer["n4"]
        assert max(Counter(c for c in endpoints.calls if c[0] == "effect").values()) == 1
        # The executor started each node once (the re-dispatch is inside the node).
        started_nodes = [e.node_started.node_id for e in events if e.HasField("node_started")]
        assert sorted(started_nodes) == ["n1", "n2", "n3", "n4"]
        # Bounded: n1 waited out the dead gateway's lease, not the run's deadline.
        assert finished_at - restarted < LEASE_SECONDS + 10
        print(
            f"killed at {killed - started:.2f}s, serving again {restarted - killed:.2f}s later, "
            f"run finished {finished_at - restarted:.2f}s after that"
        )

        stored = (await executor.GetRun(executor_pb2.GetRunRequest(run_id=run_id), timeout=10)).run
        assert (stored.status, stored.failed_nodes) == (RUN_FAILED, 1)
        assert {o.node_id: o.error.code for o in stored.outcomes} == {
            "n1": "IDEMPOTENCY_UNKNOWN",
            "n2": "",
            "n3": "",
            "n4": "",
        }
    except BaseException:
        show(stack, endpoints)
        raise


async def stored_outcomes(redis_url: str) -> dict[bytes, bytes]:
    """State of every idempotency record in Redis (``d`` = outcome stored)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match="trellis:idem:*") if b":lease" not in k]
        return {key: await client.hget(key, "s") for key in keys}
    finally:
        await client.aclose()


async def test_an_effect_finished_for_a_dead_caller_is_replayed_by_a_restarted_gateway(
    process_stack, redis_server, endpoints: Endpoints, tmp_path: Path, channels
) -> None:
    endpoints.delay["effect"] = 1.5
    stack = await start_stack(process_stack, tmp_path, endpoints, redis_server.url)
    try:
        executor = executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))
        run_id = f"gw-replay-{uuid.uuid4().hex[:10]}"
        call = executor.Run(
            executor_pb2.RunRequest(run_id=run_id, plan=[node("n1", "effect")]),
            timeout=RUN_TIMEOUT,
        )
        first = await asyncio.wait_for(call.read(), 15)
        assert first.HasField("started")
        await asyncio.wait_for(endpoints.event("arrived", "effect", "n1").wait(), 15)
        stack.processes["executor"].kill()  # the caller dies; the gateway goes on
        with pytest.raises(grpc.aio.AioRpcError):
            while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
                pass
        await asyncio.wait_for(endpoints.event("answered", "effect", "n1").wait(), 10)
        deadline = time.monotonic() + 10
        while list((await stored_outcomes(redis_server.url)).values()) != [b"d"]:
            assert time.monotonic() < deadline, await stored_outcomes(redis_server.url)
            await asyncio.sleep(0.05)

        stack.processes["toolgateway"].kill()  # its in-process memory is gone ...
        await stack.restart("toolgateway")  # ... Redis still has the outcome
        await stack.restart("executor")  # resumes its own unfinished run at start-up
        resumed: list[executor_pb2.RunResponse] = []
        async for event in executor_pb2_grpc.ExecutorServiceStub(
            channels.get(stack.executor_target)
        ).ResumeRun(
            executor_pb2.ResumeRunRequest(run_id=run_id),
            timeout=RUN_TIMEOUT,
            wait_for_ready=True,  # the channel is still backing off from the killed process
        ):
            resumed.append(event)
        assert resumed and resumed[-1].HasField("finished"), kinds(resumed)
        assert resumed[-1].finished.status == SUCCEEDED
        [outcome] = [e.node_finished.outcome for e in resumed if e.HasField("node_finished")]
        assert outcome.status == NODE_SUCCEEDED, outcome
        assert from_value(outcome.output) == endpoints.first_answer["n1"]
        assert endpoints.count("effect", "n1") == 1
    except BaseException:
        show(stack, endpoints)
        raise


# -- the executor's re-dispatch, without processes ----------------------------------------


def unavailable(node_id: str, code: str = "UNAVAILABLE") -> common_pb2.NodeOutcome:
    outcome = ended(node_id, NODE_FAILED, code, "the gateway could not be reached")
    outcome.error.retryable = True
    return outcome


class Gateway:
    """``run_node`` answering ``failures`` outcomes first, then success."""

    def __init__(self, *failures: common_pb2.NodeOutcome | None) -> None:
        self.failures = list(failures)
        self.calls: list[float] = []

    async def __call__(self, call: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        self.calls.append(time.monotonic())
        if self.failures:
            failure = self.failures.pop(0)
            if failure is not None:
                return failure
        return common_pb2.NodeOutcome(node_id=call.node_id, status=NODE_SUCCEEDED)


async def test_a_node_the_gateway_did_not_answer_is_dispatched_again() -> None:
    gateway = Gateway(unavailable("n1"), unavailable("n1", "IDEMPOTENCY_STORE_UNAVAILABLE"))
    scheduler = DagScheduler(gateway, SchedulerEvents(), max_parallel=4)
    with context.request_scope(timeout=10):
        await scheduler.run_plan([node("n1", "effect")])
    assert scheduler.outcomes["n1"].status == NODE_SUCCEEDED
    assert len(gateway.calls) == 3
    gaps = [b - a for a, b in itertools.pairwise(gateway.calls)]
    first, _ = REDISPATCH_BACKOFF
    assert first / 2 <= gaps[0] and first <= gaps[1]  # backing off


async def test_re_dispatch_stops_at_the_runs_deadline() -> None:
    gateway = Gateway(*[unavailable("n1")] * 100)
    scheduler = DagScheduler(gateway, SchedulerEvents(), max_parallel=4)
    started = time.monotonic()
    with context.request_scope(timeout=1.0):
        await scheduler.run_plan([node("n1", "effect")])
    assert time.monotonic() - started < 1.2
    assert scheduler.outcomes["n1"].error.code == "UNAVAILABLE"  # the last failure
    assert 2 <= len(gateway.calls) < 10


async def test_failures_the_gateway_decided_are_not_dispatched_again() -> None:
    timeout = unavailable("n1", "TOOL_TIMEOUT")  # retryable, but the gateway's own answer
    gateway = Gateway(timeout)
    scheduler = DagScheduler(gateway, SchedulerEvents(), max_parallel=4)
    await scheduler.run_plan([node("n1", "effect")])
    assert scheduler.outcomes["n1"].error.code == "TOOL_TIMEOUT"
    assert len(gateway.calls) == 1
