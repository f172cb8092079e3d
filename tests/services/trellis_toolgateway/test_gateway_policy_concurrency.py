"""Per-tool max concurrency: at most N calls run, the rest wait in a bounded FIFO
line, a full line is RESOURCE_EXHAUSTED (TOOL_BUSY), a deadline ends the wait."""

import asyncio

import grpc
import pytest
from opentelemetry.trace import NoOpTracer

from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.errors import ResourceExhausted, to_status
from trellis.runtime.server import Service
from trellis.runtime.settings import ServiceSettings
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.policy.concurrency import ConcurrencyLimiter, Limiters
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.servicer import ToolGatewayServicer
from trellis_toolgateway.tools.base import FunctionTool, Spec

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
SERVICE_NAME = toolgateway_pb2.DESCRIPTOR.services_by_name["ToolGatewayService"].full_name


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- the limiter alone -----------------------------------------------------------------


async def test_limiter_admits_limit_queues_the_rest_and_rejects_beyond_the_queue() -> None:
    limiter = ConcurrencyLimiter(2, 2, name="t")
    await limiter.acquire()
    await limiter.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    waiting = [asyncio.create_task(wait(i)) for i in (1, 2)]
    await settle()
    assert (limiter.running, limiter.waiting, order) == (2, 2, [])
    with pytest.raises(ResourceExhausted) as raised:
        await limiter.acquire()
    assert (raised.value.reason, raised.value.metadata) == ("TOOL_BUSY", {"tool": "t"})
    limiter.release()
    await settle()
    assert order == [1]  # first come, first served
    limiter.release()
    await asyncio.gather(*waiting)
    assert (order, limiter.running, limiter.waiting) == ([1, 2], 2, 0)
    limiter.release()
    limiter.release()
    assert limiter.running == 0


async def test_a_waiter_that_gives_up_leaves_the_line() -> None:
    limiter = ConcurrencyLimiter(1, 1)
    await limiter.acquire()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await limiter.acquire()
    assert limiter.waiting == 0
    limiter.release()
    assert limiter.running == 0
    await limiter.acquire()  # free again


async def test_a_slot_handed_to_a_waiter_that_was_cancelled_passes_on() -> None:
    limiter = ConcurrencyLimiter(1, 2)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    second = asyncio.create_task(limiter.acquire())
    await settle()
    limiter.release()  # hands the slot to ``first`` ...
    first.cancel()  # ... which is cancelled before it runs
    await asyncio.wait_for(second, 1)  # so ``second`` gets it
    assert first.cancelled() and limiter.running == 1 and limiter.waiting == 0


def test_limiters_follow_the_spec() -> None:
    limiters = Limiters(queue_per_slot=3)
    spec = Spec("t", "", {}, {}, max_concurrency=2)
    limiter = limiters.get(spec)
    assert limiter is not None and (limiter.limit, limiter.queue_size) == (2, 6)
    assert limiters.get(spec) is limiter
    resized = limiters.get(Spec("t", "", {}, {}, max_concurrency=5))
    assert resized is not limiter and resized is not None and resized.limit == 5
    assert limiters.get(Spec("t", "", {}, {}, max_concurrency=0)) is None


# -- inside the invoker ----------------------------------------------------------------


class Gated:
    """A tool that blocks until released and records how many runs overlap."""

    def __init__(self, max_concurrency: int, *, timeout: float = 10) -> None:
        self.gate = asyncio.Event()
        self.running = self.peak = self.runs = 0
        spec = Spec(
            "gated",
            "waits",
            {"type": "object"},
            {"type": "object"},
            max_concurrency=max_concurrency,
            timeout=timeout,
        )
        self.tool = FunctionTool(spec, self._run)

    async def _run(self, args: dict) -> dict:
        self.runs += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return {"i": args.get("i")}


def invoker_for(tool: Gated, *, queue_per_slot: int = 4) -> Invoker:
    return Invoker(ToolRegistry([tool.tool]), None, NoOpTracer(), queue_per_slot=queue_per_slot)


async def test_at_most_max_concurrency_run_and_a_full_queue_is_tool_busy() -> None:
    gated = Gated(2)
    invoker = invoker_for(gated, queue_per_slot=4)  # 2 running + 8 waiting
    calls = [asyncio.create_task(invoker.invoke(Call("gated", {"i": i}))) for i in range(10)]
    await settle()
    assert (gated.running, gated.runs) == (2, 2)
    with pytest.raises(ResourceExhausted) as raised:
        await invoker.invoke(Call("gated", {"i": 10}))
    assert raised.value.reason == "TOOL_BUSY"
    assert to_status(raised.value).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    gated.gate.set()
    outcomes = await asyncio.gather(*calls)
    assert [o.status for o in outcomes] == [SUCCEEDED] * 10
    assert (gated.peak, gated.runs) == (2, 10)
    # The line drained: the tool takes calls again.
    assert (await invoker.invoke(Call("gated", {"i": 11}))).status == SUCCEEDED


async def test_without_a_queue_the_limit_itself_rejects() -> None:
    gated = Gated(1)
    invoker = invoker_for(gated, queue_per_slot=0)
    running = asyncio.create_task(invoker.invoke(Call("gated", {})))
    await settle()
    with pytest.raises(ResourceExhausted):
        await invoker.invoke(Call("gated", {}))
    gated.gate.set()
    assert (await running).status == SUCCEEDED


async def test_the_deadline_ends_a_wait_in_line() -> None:
    gated = Gated(1)
    invoker = invoker_for(gated)
    holder = asyncio.create_task(invoker.invoke(Call("gated", {})))
    await settle()
    with context.request_scope(timeout=0.02):
        outcome = await invoker.invoke(Call("gated", {}))
    assert (outcome.error.code, outcome.error.retryable, outcome.attempts) == (
        "DEADLINE_EXCEEDED",
        False,
        0,
    )
    assert gated.runs == 1
    gated.gate.set()
    await holder


async def test_unbounded_tools_run_every_call_at_once() -> None:
    gated = Gated(0)
    invoker = invoker_for(gated)
    calls = [asyncio.create_task(invoker.invoke(Call("gated", {"i": i}))) for i in range(50)]
    await settle()
    assert gated.running == 50
    gated.gate.set()
    await asyncio.gather(*calls)


async def test_a_cancelled_call_frees_its_slot() -> None:
    gated = Gated(1)
    invoker = invoker_for(gated, queue_per_slot=1)
    first = asyncio.create_task(invoker.invoke(Call("gated", {})))
    await settle()
    first.cancel()
    await settle()
    gated.gate.set()
    outcome = await asyncio.wait_for(invoker.invoke(Call("gated", {})), 1)
    assert outcome.status == SUCCEEDED


async def test_tool_busy_reaches_a_grpc_client_as_resource_exhausted(serve, channels) -> None:
    gated = Gated(1)

    async def build(settings, telemetry, chans) -> Service:
        invoker = Invoker(ToolRegistry([gated.tool]), None, telemetry.tracer, queue_per_slot=0)
        servicer = ToolGatewayServicer(ToolRegistry([gated.tool]), invoker)

        def register(server) -> None:
            toolgateway_pb2_grpc.add_ToolGatewayServiceServicer_to_server(servicer, server)

        return Service("toolgateway", [SERVICE_NAME], register)

    settings = ServiceSettings(host="127.0.0.1", port=0, metrics_port=0)
    server = await serve("toolgateway", build, settings)
    client = ToolGatewayClient(channels.get(server.target), timeout=5)
    call = toolgateway_pb2.InvokeToolRequest(call=common_pb2.ToolCall(node_id="n", tool="gated"))
    running = asyncio.create_task(client.invoke(call))
    for _ in range(100):  # until the first call holds the only slot
        await asyncio.sleep(0.01)
        if gated.running:
            break
    with pytest.raises(ResourceExhausted) as raised:
        await client.invoke(call)
    assert (raised.value.reason, raised.value.metadata) == ("TOOL_BUSY", {"tool": "gated"})
    gated.gate.set()
    assert (await running).status == SUCCEEDED
