"""Executor fail-over: two executor processes share one PostgreSQL run store; the owner
of a run is SIGKILLed mid-run, the other replica takes the run over once its lease
expires, finishes it, and a side-effecting tool sees exactly one execution per node.

The rest of the stack (cache, costs, tool gateway, planner) runs in the test process on
loopback ports; the executors are real ``python -m trellis_executor`` processes, so the
kill is a real crash (no graceful shutdown, no cleanup, the lease just stops renewing).
The side-effecting tool is an HTTP endpoint served by this test: it records every POST
when it arrives and answers ~0.8 s later, so a node can be caught in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the fixture's types (tests/conftest.py)
    from conftest import ServiceProcess, StartProcess

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from aiohttp import web

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import from_value, to_struct
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings
from trellis_planner.service import build as build_planner
from trellis_planner.settings import PlannerSettings
from trellis_toolgateway.service import build as build_toolgateway
from trellis_toolgateway.settings import GatewaySettings

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
NODE_SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
EXECUTOR_SERVICE = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name

TOOL = "effect"
#: n1 → n2 → n3 → n4 is a chain; n5 depends on nothing.
NODES = ("n1", "n2", "n3", "n4", "n5")
#: How long the effect endpoint takes to answer (after recording the call).
EFFECT_SECONDS = 0.8
LEASE_SECONDS = 2.0
#: Bound of ResumeRun on the survivor: lease expiry + take-over + n2..n4 fit easily.
RESUME_TIMEOUT = 30.0
STARTUP_TIMEOUT = 30.0


# -- the side-effecting tool ----------------------------------------------------------------


@dataclass
class EffectServer:
    """An HTTP endpoint with a side effect: every POST it receives is one execution."""

    port: int = 0
    #: Node of every POST, in order of arrival (recorded before answering).
    calls: list[str] = field(default_factory=list)
    #: The answer to the first POST of each node.
    first_answer: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrived: dict[str, asyncio.Event] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/effect"

    def arrival(self, node: str) -> asyncio.Event:
        return self.arrived.setdefault(node, asyncio.Event())

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        node = str(body.get("node"))
        self.calls.append(node)
        answer = {"ok": True, "node": node, "execution": len(self.calls)}
        self.first_answer.setdefault(node, answer)
        self.arrival(node).set()
        await asyncio.sleep(EFFECT_SECONDS)
        return web.json_response(answer)


@pytest.fixture
async def effects(http_app) -> EffectServer:
    server = EffectServer()
    app = web.Application()
    app.router.add_post("/effect", server.handle)
    server.port = await http_app(app)
    return server


def write_tools_file(path: Path, effects: EffectServer) -> Path:
    tools = {
        "version": 1,
        "tools": [
            {
                "name": TOOL,
                "kind": "http",
                "description": "Records one side effect per call (test tool).",
                "method": "POST",
                "url": effects.url,
                "allowed_hosts": ["127.0.0.1"],
                "body_args": ["node"],
                "side_effects": True,
                "timeout": 10,
                "input_schema": {
                    "type": "object",
                    "properties": {"node": {"type": "string"}},
                    "required": ["node"],
                    "additionalProperties": False,
                },
            }
        ],
    }
    path.write_text(yaml.safe_dump(tools, sort_keys=False))
    return path


# -- executor processes -------------------------------------------------------------------


def start_executor(
    start: StartProcess, instance_id: str, database_url: str, peers: dict[str, str]
) -> ServiceProcess:
    env = {
        "TRELLIS_DATABASE_URL": database_url,
        "TRELLIS_INSTANCE_ID": instance_id,
        "TRELLIS_LEASE_SECONDS": str(LEASE_SECONDS),
        "TRELLIS_TOOLGATEWAY_TARGET": peers["toolgateway"],
        "TRELLIS_PLANNER_TARGET": peers["planner"],
        "TRELLIS_COSTS_TARGET": peers["costs"],
        "TRELLIS_CACHE_TARGET": peers["cache"],
    }
    return start("trellis_executor", instance_id, EXECUTOR_SERVICE, env)


def print_logs(executors: list[ServiceProcess], effects: EffectServer) -> None:
    print(f"effect endpoint received (in order): {effects.calls}")
    for executor in executors:
        print(f"----- executor {executor.name} (pid {executor.pid}) -----")
        print(executor.output())


# -- the test ---------------------------------------------------------------------------


def effect_node(node_id: str, *deps: str) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        node_id=node_id, tool=TOOL, args=to_struct({"node": node_id}), depends_on=deps
    )


def kinds(events: list[executor_pb2.RunResponse]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


async def test_survivor_finishes_a_killed_owners_run_with_one_execution_per_node(
    postgres_url: str, tmp_path: Path, serve, model, channels, effects, service_process
) -> None:
    # -- the shared services, in this process ------------------------------------------
    common: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0}
    cache = await serve("cache", build_cache, CacheSettings(**common))
    costs = await serve(
        "costs",
        build_costs,
        CostsSettings(**common, database_url=f"sqlite:///{tmp_path}/costs.db"),
    )
    gateway = await serve(
        "toolgateway",
        build_toolgateway,
        GatewaySettings(
            **common,
            tools_file=write_tools_file(tmp_path / "tools.yaml", effects),
            tools_reload_seconds=0,
            cache_target=cache.target,
            costs_target=costs.target,
        ),
    )
    planner = await serve(
        "planner",
        build_planner,
        PlannerSettings(**common, costs_target=costs.target, openai_base_url=model.base_url),
    )
    peers = {
        "cache": cache.target,
        "costs": costs.target,
        "toolgateway": gateway.target,
        "planner": planner.target,
    }

    # -- two executor replicas on one PostgreSQL database ---------------------------------
    owner = start_executor(service_process, "exec-a", postgres_url, peers)
    survivor = start_executor(service_process, "exec-b", postgres_url, peers)
    executors = [owner, survivor]
    try:
        await asyncio.gather(
            owner.wait_serving(STARTUP_TIMEOUT), survivor.wait_serving(STARTUP_TIMEOUT)
        )
        on_owner = executor_pb2_grpc.ExecutorServiceStub(channels.get(owner.target))
        on_survivor = executor_pb2_grpc.ExecutorServiceStub(channels.get(survivor.target))

        # -- start the run on A; kill A while n2 is in flight at the tool ------------------
        run_id = f"failover-{uuid.uuid4().hex[:12]}"
        plan = [
            effect_node("n1"),
            effect_node("n2", "n1"),
            effect_node("n3", "n2"),
            effect_node("n4", "n3"),
            effect_node("n5"),
        ]
        call = on_owner.Run(executor_pb2.RunRequest(run_id=run_id, plan=plan), timeout=30)
        on_a: list[executor_pb2.RunResponse] = []

        async def until_n2_started() -> None:
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    pytest.fail(f"Run on {owner} ended early: {kinds(on_a)}")
                on_a.append(event)
                if event.HasField("finished"):
                    pytest.fail(f"run finished on {owner} before the kill: {event}")
                if event.HasField("node_started") and event.node_started.node_id == "n2":
                    return

        await asyncio.wait_for(until_n2_started(), 15)
        await asyncio.wait_for(effects.arrival("n2").wait(), 5)  # n2's effect is under way
        assert "n2" not in [
            e.node_finished.outcome.node_id for e in on_a if e.HasField("node_finished")
        ]
        owner.kill()

        try:  # the client's stream breaks with the owner; that is expected
            while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            pass
        assert "n2" in effects.calls and effects.calls.count("n2") == 1

        # -- ResumeRun on B: it takes the run over when A's lease expires ----------------
        resumed: list[executor_pb2.RunResponse] = []
        resume = on_survivor.ResumeRun(
            executor_pb2.ResumeRunRequest(run_id=run_id), timeout=RESUME_TIMEOUT
        )
        try:
            async for event in resume:
                resumed.append(event)
                if event.HasField("finished"):
                    break
        except grpc.aio.AioRpcError as error:
            pytest.fail(
                f"ResumeRun({run_id!r}) on {survivor} failed after the owner "
                f"{owner} was SIGKILLed: {error.code().name}: {error.details()} "
                f"(events so far: {kinds(resumed)}). Expected the survivor to take the run "
                f"over once its {LEASE_SECONDS:g}s lease expired and stream it to `finished`."
            )
        finally:
            resume.cancel()
        assert resumed and resumed[-1].HasField("finished"), (
            f"ResumeRun ended without a finished event: {kinds(resumed)}"
        )
        assert all(e.run_id == run_id for e in resumed)
        finished = resumed[-1].finished
        assert finished.status == SUCCEEDED, (
            f"resumed run ended {executor_pb2.RunStatus.Name(finished.status)}: "
            f"{finished.error.code} {finished.error.message}"
        )

        # -- the stored run, and exactly one execution per node ---------------------------
        stored = (
            await on_survivor.GetRun(executor_pb2.GetRunRequest(run_id=run_id), timeout=10)
        ).run
        assert stored.status == SUCCEEDED
        outcomes = {o.node_id: o for o in stored.outcomes}
        assert len(stored.outcomes) == len(NODES)
        assert {n: common_pb2.NodeStatus.Name(o.status) for n, o in outcomes.items()} == {
            n: common_pb2.NodeStatus.Name(NODE_SUCCEEDED) for n in NODES
        }
        assert Counter(effects.calls) == Counter(NODES), (
            f"side effects per node: {dict(Counter(effects.calls))} (calls in order: "
            f"{effects.calls}); every node must run exactly once across the fail-over"
        )
        # n2 was in flight when A died: its outcome is the answer to that first execution
        assert from_value(outcomes["n2"].output) == effects.first_answer["n2"]
        for node in NODES:
            assert from_value(outcomes[node].output) == effects.first_answer[node]
    except BaseException:
        print_logs(executors, effects)
        raise
