"""Batching and model-tool fan-out figures (issue 18), timed at gRPC clients.

- ``batching``: 50 concurrent InvokeTool calls of an HTTP tool declared with
  ``batch: {max_items: 16, max_wait_ms: 50}``, against an aiohttp server that answers
  every request (one call or a batch) after 20 ms. The gateway runs in this process as a
  real gRPC server (``start_service``, interceptors, tracing) over the registry of that
  tools file, no cache, so every call reaches the backend. ``backend_requests`` is what
  the server received; ``unbatched_*`` is the same 50 calls of the same endpoint declared
  without ``batch``, in the same run. Calls are distinct (no single-flight).
- ``model_fanout``: the embedded stack (``trellis_cli.stack.start_stack``) with a tools
  file holding one model tool (structured output, not cached, not batched), the offline
  model pausing 300 ms before every answer. ``single_call_ms``: an explicit plan of one
  model-tool node, Run to ``finished`` (median of 5); ``wall_ms``: a plan of 10
  independent model-tool nodes (median of 5). The nodes run at once, each its own
  Generate through the planner (budget check, rate limits, usage recorded), so the ideal
  is one call.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from grpc import aio

from bench.dag_common import call, median, timed_run
from trellis.clients.executor import ExecutorClient
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.channels import Channels
from trellis.runtime.convert import to_struct
from trellis.runtime.server import Service, start_service
from trellis.runtime.telemetry import Telemetry
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc
from trellis_cli.stack import start_stack
from trellis_offline_model.behaviour import Behaviour
from trellis_toolgateway.invoker import Invoker
from trellis_toolgateway.loader import LoadOptions, declared_tools, parse_tools_file
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.service import SERVICE_NAME, http_client
from trellis_toolgateway.servicer import ToolGatewayServicer
from trellis_toolgateway.settings import GatewaySettings

TARGETS: dict[str, tuple[str, float]] = {
    "batching.backend_requests": ("<=", 5),
    "model_fanout.wall_over_single": ("<=", 1.3),
}
CALLS, MAX_ITEMS, WAIT_MS, BACKEND_MS = 50, 16, 50, 20
FANOUT, MODEL_MS = 10, 300
SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED

HTTP_TOOLS = """
version: 1
tools:
  - name: quote
    kind: http
    method: POST
    url: http://127.0.0.1:{port}/quote
    batch_url: http://127.0.0.1:{port}/quotes
    allowed_hosts: ["127.0.0.1:{port}"]
    body_args: [symbol]
    side_effects: false
    batch: {{max_items: {max_items}, max_wait_ms: {wait_ms}}}
  - name: quote_one_by_one
    kind: http
    method: POST
    url: http://127.0.0.1:{port}/quote
    allowed_hosts: ["127.0.0.1:{port}"]
    body_args: [symbol]
    side_effects: false
"""

MODEL_TOOLS = """
version: 1
tools:
  - name: summarize
    kind: model
    input_schema:
      type: object
      properties: {text: {type: string}}
      required: [text]
    output_schema:
      type: object
      properties: {summary: {type: string}}
      required: [summary]
      additionalProperties: false
    prompt:
      - {role: system, content: "Summarise the text in one sentence."}
      - {role: user, content: "{text}"}
"""


class QuoteBackend:
    """Answers each request after ``BACKEND_MS``, whatever it carries; counts requests."""

    def __init__(self) -> None:
        self.requests = 0

    def app(self) -> web.Application:
        async def quote(request: web.Request) -> web.Response:
            self.requests += 1
            body = await request.json()
            await asyncio.sleep(BACKEND_MS / 1000)
            return web.json_response({"symbol": body["symbol"], "price": 1})

        async def quotes(request: web.Request) -> web.Response:
            self.requests += 1
            items = (await request.json())["items"]
            await asyncio.sleep(BACKEND_MS / 1000)
            return web.json_response(
                {"results": [{"symbol": i["symbol"], "price": 1} for i in items]}
            )

        app = web.Application()
        app.router.add_post("/quote", quote)
        app.router.add_post("/quotes", quotes)
        return app


def _gateway(registry: ToolRegistry):
    async def build(settings: Any, telemetry: Telemetry, channels: Channels) -> Service:
        servicer = ToolGatewayServicer(registry, Invoker(registry, None, telemetry.tracer))

        def register(server: aio.Server) -> None:
            toolgateway_pb2_grpc.add_ToolGatewayServiceServicer_to_server(servicer, server)

        return Service("toolgateway", [SERVICE_NAME], register)

    return build


async def _fan_out(client: ToolGatewayClient, tool: str, tag: str) -> float:
    """Wall ms of CALLS concurrent distinct calls of ``tool``; all must succeed."""

    def request(i: int) -> toolgateway_pb2.InvokeToolRequest:
        args = to_struct({"symbol": f"{tag}{i}"})
        node = common_pb2.ToolCall(node_id=f"n{i}", tool=tool, args=args)
        return toolgateway_pb2.InvokeToolRequest(call=node, run_id="bench")

    start = time.perf_counter()
    outcomes = await asyncio.gather(*(client.invoke(request(i)) for i in range(CALLS)))
    wall = (time.perf_counter() - start) * 1000
    failed = [o.error.code for o in outcomes if o.status != SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} calls of {tool} failed: {failed[:3]}")
    return wall


async def measure_batching() -> dict[str, Any]:
    backend = QuoteBackend()
    runner = web.AppRunner(backend.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    client = http_client()
    text = HTTP_TOOLS.format(port=port, max_items=MAX_ITEMS, wait_ms=WAIT_MS)
    with tempfile.TemporaryDirectory() as tmp:
        registry = declared_tools(
            parse_tools_file(text, "bench"),
            Path(tmp) / "tools.yaml",
            LoadOptions(http_client=client),
        )
    settings = GatewaySettings(host="127.0.0.1", port=0, metrics_port=0)  # type: ignore[arg-type]
    server = await start_service(settings, "toolgateway", _gateway(registry))
    channel = aio.insecure_channel(server.target)
    try:
        gateway = ToolGatewayClient(channel, timeout=30)
        await _fan_out(gateway, "quote", "warm")  # connections, first-call costs
        await _fan_out(gateway, "quote_one_by_one", "warm")
        backend.requests = 0
        unbatched_ms = await _fan_out(gateway, "quote_one_by_one", "u")
        unbatched_requests, backend.requests = backend.requests, 0
        batched_ms = await _fan_out(gateway, "quote", "b")
        batched_requests = backend.requests
    finally:
        await channel.close()
        await server.stop(0)
        await client.aclose()
        await runner.cleanup()
    return {
        "calls": CALLS,
        "max_items": MAX_ITEMS,
        "max_wait_ms": WAIT_MS,
        "backend_ms": BACKEND_MS,
        "backend_requests": batched_requests,
        "wall_ms": round(batched_ms, 3),
        "unbatched_backend_requests": unbatched_requests,
        "unbatched_wall_ms": round(unbatched_ms, 3),
    }


async def measure_model_fanout(samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tools = Path(tmp) / "tools.yaml"
        tools.write_text(MODEL_TOOLS)
        stack = await start_stack(database_url=f"sqlite:///{tmp}/bench.db", tools_file=str(tools))
        assert stack.model is not None
        stack.model.state.next_behaviour = lambda body: Behaviour(stall_seconds=MODEL_MS / 1000)
        channels = Channels()
        try:
            client = ExecutorClient(channels.get(stack.executor_target))

            def plan(count: int) -> executor_pb2.RunRequest:
                nodes = [
                    call(f"s{i}", "summarize", text=f"Report {i}: the disk is {i}0% full.")
                    for i in range(count)
                ]
                return executor_pb2.RunRequest(plan=nodes)

            await timed_run(client, plan(FANOUT))  # warm-up: connections, first calls
            singles = [(await timed_run(client, plan(1))).wall_ms for _ in range(samples)]
            fanouts = [await timed_run(client, plan(FANOUT)) for _ in range(samples)]
        finally:
            await channels.close()
            await stack.stop()
    for run in fanouts:
        if run.finished.status != executor_pb2.RUN_STATUS_SUCCEEDED:
            raise RuntimeError(f"a fan-out run ended {run.finished.status}: {run.finished.error}")
    single_ms, wall_ms = median(singles), median([run.wall_ms for run in fanouts])
    usage = fanouts[-1].finished.usage
    return {
        "nodes": FANOUT,
        "model_ms": MODEL_MS,
        "single_call_ms": round(single_ms, 3),
        "wall_ms": round(wall_ms, 3),
        "wall_over_single": round(wall_ms / single_ms, 4),
        "input_tokens": usage.input_tokens,
        "cost_nano_usd": fanouts[-1].finished.cost_nano_usd,
    }


async def run(*, quick: bool = False) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "batching": await measure_batching(),
        "model_fanout": await measure_model_fanout(1 if quick else 5),
    }
    return sections
