"""Faults: Redis killed mid-run, services as processes (``process_stack``, ``redis_server``).

1. The cache service keeps results in Redis. Redis is SIGKILLed while a run is in
   flight: the run still succeeds, its cacheable call runs uncached (``cache_hit``
   false, not slowed by more than the cache's bound), and so does a call that was a
   hit a moment before; the gateway counts the failed lookups
   (``trellis_cache_requests_total{result="error"}``). Redis comes back (empty, as after
   a crash without persistence): the cache works again by itself - a repeated call hits.
2. The gateway keeps side-effecting calls' idempotency keys in the same Redis. With
   Redis down such a call cannot be promised to run at most once, so the gateway refuses
   it (UNAVAILABLE, IDEMPOTENCY_STORE_UNAVAILABLE) and runs nothing; the executor
   dispatches it again, and once Redis is back the call runs - once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import from_value, to_struct

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
NODE_SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
SLEEP_MS = 1500


def call(node_id: str, tool: str, args: dict, *deps: str) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def plan(expression: str, sleep_ms: int = 0) -> list[common_pb2.ToolCall]:
    """sleep, then arithmetic (cacheable for an hour)."""
    return [
        call("wait", "sleep", {"ms": sleep_ms}),
        call("math", "arithmetic", {"expression": expression}, "wait"),
    ]


class Runs:
    """Runs an explicit plan on the stack's executor and collects its events."""

    def __init__(self, channels, target: str) -> None:
        self._stub = executor_pb2_grpc.ExecutorServiceStub(channels.get(target))

    def start(self, calls: list[common_pb2.ToolCall]):
        run_id = f"faults-{uuid.uuid4().hex[:10]}"
        return self._stub.Run(executor_pb2.RunRequest(run_id=run_id, plan=calls), timeout=60)

    async def collect(self, stream) -> list[executor_pb2.RunResponse]:
        events = [event async for event in stream]
        assert events and events[-1].HasField("finished"), events
        return events

    async def run(self, calls: list[common_pb2.ToolCall]) -> list[executor_pb2.RunResponse]:
        return await self.collect(self.start(calls))


def outcome(events: list[executor_pb2.RunResponse], node_id: str) -> common_pb2.NodeOutcome:
    [found] = [
        e.node_finished.outcome
        for e in events
        if e.HasField("node_finished") and e.node_finished.outcome.node_id == node_id
    ]
    return found


async def scrape(port: int, name: str, **labels: str) -> float:
    """The value of one sample of a process's /metrics (0 when absent)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_redis_killed_mid_run_tools_run_uncached_and_the_cache_recovers(
    process_stack, redis_server, channels
) -> None:
    stack = await process_stack(
        per_service={"cache": {"TRELLIS_REDIS_URL": redis_server.url}},
    )
    runs = Runs(channels, stack.executor_target)
    gateway_metrics = stack.metrics_ports["toolgateway"]
    try:
        # Redis up: the second identical call is a hit.
        first = await runs.run(plan("6*7"))
        again = await runs.run(plan("6*7"))
        assert (outcome(first, "math").cache_hit, outcome(again, "math").cache_hit) == (
            False,
            True,
        )
        errors_before = await scrape(
            gateway_metrics, "trellis_cache_requests_total", result="error"
        )

        # Redis dies while a run is under way (its first node sleeping).
        stream = runs.start(plan("17*23", SLEEP_MS))
        events = []
        async for event in stream:
            events.append(event)
            if event.HasField("node_started") and event.node_started.node_id == "wait":
                break
        started = time.monotonic()
        redis_server.stop()
        events += await runs.collect(stream)
        elapsed = time.monotonic() - started
        assert events[-1].finished.status == SUCCEEDED, events[-1].finished
        math = outcome(events, "math")
        assert (math.status, math.cache_hit, from_value(math.output)) == (
            NODE_SUCCEEDED,
            False,
            {"result": 391},
        )
        # The sleep, plus at most the gateway's cache bound (1 s) for the failed lookup.
        assert elapsed < SLEEP_MS / 1000 + 3.0, elapsed

        # Still down: what was a hit a moment ago now runs, uncached, and succeeds.
        down = await runs.run(plan("6*7"))
        assert down[-1].finished.status == SUCCEEDED
        assert (outcome(down, "math").status, outcome(down, "math").cache_hit) == (
            NODE_SUCCEEDED,
            False,
        )
        errors = await scrape(gateway_metrics, "trellis_cache_requests_total", result="error")
        assert errors >= errors_before + 2, (errors_before, errors)

        # Redis is back (empty): the cache recovers without restarting anything.
        redis_server.start()
        hits, tries = [], 0
        deadline = time.monotonic() + 15
        while not any(hits):
            assert time.monotonic() < deadline, f"no cache hit after Redis returned: {hits}"
            back = await runs.run(plan("2**10"))
            assert back[-1].finished.status == SUCCEEDED
            hits.append(outcome(back, "math").cache_hit)
            tries += 1
        # One miss fills the entry (two if the first lookup met a stale connection).
        assert tries <= 3, hits
        assert from_value(outcome(back, "math").output) == {"result": 1024}
    except BaseException:
        for name in ("cache", "toolgateway"):
            print(f"----- {name} -----\n{stack.processes[name].output()}")
        raise


# -- side effects with the idempotency store in Redis -----------------------------------


@pytest.fixture
async def effect_endpoint(http_app) -> tuple[str, list[str]]:
    """``(url, requests)``: a POST endpoint recording the node of every request."""
    requests: list[str] = []

    async def effect(request: web.Request) -> web.Response:
        body = await request.json()
        requests.append(body["node"])
        return web.json_response({"ok": True, "request": len(requests)})

    app = web.Application()
    app.router.add_post("/effect", effect)
    return f"http://127.0.0.1:{await http_app(app)}/effect", requests


async def test_redis_down_holds_side_effects_until_it_returns_then_runs_them_once(
    process_stack, redis_server, channels, effect_endpoint, tmp_path: Path
) -> None:
    url, requests = effect_endpoint
    tools = {
        "version": 1,
        "tools": [
            {
                "name": "effect",
                "kind": "http",
                "description": "One side effect per request (test tool).",
                "method": "POST",
                "url": url,
                "allowed_hosts": ["127.0.0.1"],
                "body_args": ["node"],
                "side_effects": True,
                "input_schema": {
                    "type": "object",
                    "properties": {"node": {"type": "string"}},
                    "required": ["node"],
                },
            }
        ],
    }
    tools_file = tmp_path / "tools.yaml"
    tools_file.write_text(yaml.safe_dump(tools))
    stack = await process_stack(
        per_service={
            "toolgateway": {
                "TRELLIS_TOOLS_FILE": str(tools_file),
                "TRELLIS_REDIS_URL": redis_server.url,
            }
        },
    )
    runs = Runs(channels, stack.executor_target)
    try:
        redis_server.stop()
        stream = runs.start([call("n1", "effect", {"node": "n1"})])
        await asyncio.sleep(2.0)
        assert requests == []  # refused, not run: at most once cannot be promised
        redis_server.start()
        events = await asyncio.wait_for(runs.collect(stream), 30)
        assert events[-1].finished.status == SUCCEEDED
        n1 = outcome(events, "n1")
        assert n1.status == NODE_SUCCEEDED, n1
        assert requests == ["n1"]
        assert "idempotency store unreachable" in stack.processes["toolgateway"].output()
    except BaseException:
        for name in ("toolgateway", "executor"):
            print(f"----- {name} -----\n{stack.processes[name].output()}")
        raise
