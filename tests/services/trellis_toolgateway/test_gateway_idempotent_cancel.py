"""Side-effecting tools with an idempotency key: a caller that goes away (the executor
killed, its stream reset) does not cancel a run that may be mid side effect; the run
finishes in the background and the retry with the key gets its outcome."""

import asyncio

import pytest
from opentelemetry.trace import NoOpTracer
from structlog.testing import capture_logs

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value
from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import FunctionTool, Spec

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED


class PostOrder:
    """A side-effecting tool: records each execution at its start, answers after a while."""

    def __init__(self, *, seconds: float = 0.2, **spec: object) -> None:
        self.seconds = seconds
        self.started: list[dict] = []
        self.finished: list[dict] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.tool = FunctionTool(
            Spec(
                "post_order",
                "posts an order",
                {"type": "object"},
                {"type": "object"},
                side_effects=True,
                **spec,  # type: ignore[arg-type]
            ),
            self._run,
        )

    async def _run(self, args: dict) -> dict:
        self.started.append(args)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.seconds)
        if self.fail is not None:
            raise self.fail
        self.finished.append(args)
        return {"order_id": len(self.started)}


def invoker_for(tool: PostOrder) -> Invoker:
    return Invoker(ToolRegistry([tool.tool]), None, NoOpTracer())


async def cancel_soon(task: asyncio.Task) -> None:
    """Cancel ``task`` and check that it ends at once, cancelled."""
    task.cancel()
    await asyncio.wait([task], timeout=0.05)
    assert task.cancelled()


async def test_a_cancelled_caller_does_not_cancel_the_run_and_the_retry_gets_its_outcome() -> None:
    post = PostOrder()
    invoker = invoker_for(post)
    args = {"sku": "A1"}
    first = asyncio.create_task(
        invoker.invoke(Call("post_order", args, node_id="n1"), idempotency_key="r1/n1")
    )
    await asyncio.sleep(0.05)
    assert post.started == [args]  # the tool runs: the side effect may be under way
    await cancel_soon(first)  # the executor died; its stream reset
    again = await asyncio.wait_for(
        invoker.invoke(Call("post_order", args, node_id="n1"), idempotency_key="r1/n1"), 1
    )
    assert post.started == post.finished == [args]  # executed exactly once
    assert (again.status, again.attempts, again.node_id) == (SUCCEEDED, 1, "n1")
    assert from_value(again.output) == {"order_id": 1}


async def test_the_orphaned_run_stores_its_outcome_for_a_later_retry() -> None:
    post = PostOrder(seconds=0.05)
    invoker = invoker_for(post)
    first = asyncio.create_task(invoker.invoke(Call("post_order", {}), idempotency_key="k"))
    await asyncio.sleep(0.01)
    await cancel_soon(first)
    await asyncio.sleep(0.1)  # the run ends with nobody waiting for it
    assert len(post.finished) == 1
    again = await invoker.invoke(Call("post_order", {}, node_id="n2"), idempotency_key="k")
    assert (again.status, again.node_id, len(post.started)) == (SUCCEEDED, "n2", 1)
    assert from_value(again.output) == {"order_id": 1}


async def test_the_orphaned_run_is_still_bounded_by_the_request_deadline() -> None:
    post = PostOrder(seconds=0.5, retries=0)
    invoker = invoker_for(post)
    with context.request_scope(timeout=0.1):
        first = asyncio.create_task(invoker.invoke(Call("post_order", {}), idempotency_key="k"))
    await asyncio.sleep(0.01)
    await cancel_soon(first)
    again = await asyncio.wait_for(invoker.invoke(Call("post_order", {}), idempotency_key="k"), 1)
    # The first run reached the backend, so its outcome (cut by the deadline) is the key's.
    assert (again.error.code, again.attempts, len(post.started)) == ("DEADLINE_EXCEEDED", 1, 1)


async def test_a_call_cancelled_before_the_tool_started_does_not_hold_the_key() -> None:
    post = PostOrder(seconds=0.0, max_concurrency=1, retries=0)
    post.gate = asyncio.Event()
    invoker = invoker_for(post)
    blocker = asyncio.create_task(
        invoker.invoke(Call("post_order", {"sku": "busy"}), idempotency_key="other")
    )
    await asyncio.sleep(0.01)
    with context.request_scope(timeout=0.1):  # gives up on the slot at its deadline
        queued = asyncio.create_task(
            invoker.invoke(Call("post_order", {"sku": "A1"}), idempotency_key="k")
        )
    await asyncio.sleep(0.01)
    await cancel_soon(queued)  # still waiting for a slot: the tool never started
    await asyncio.sleep(0.15)  # past that deadline: it ran nothing and let go of the key
    post.gate.set()
    await blocker
    again = await asyncio.wait_for(
        invoker.invoke(Call("post_order", {"sku": "A1"}), idempotency_key="k"), 1
    )
    assert (again.status, again.attempts) == (SUCCEEDED, 1)
    assert post.started == [{"sku": "busy"}, {"sku": "A1"}]


async def test_an_orphaned_run_that_raises_releases_the_key_and_is_logged() -> None:
    post = PostOrder(seconds=0.05)
    post.fail = InvalidArgument("the tool rejected its arguments")
    invoker = invoker_for(post)
    with capture_logs() as events:
        first = asyncio.create_task(invoker.invoke(Call("post_order", {}), idempotency_key="k"))
        await asyncio.sleep(0.01)
        await cancel_soon(first)
        await asyncio.sleep(0.1)
    [event] = [e for e in events if e["log_level"] == "error"]
    assert event["event"] == "idempotent tool run failed after its caller left"
    assert isinstance(event["exc_info"], InvalidArgument)
    post.fail = None
    again = await invoker.invoke(Call("post_order", {}), idempotency_key="k")
    assert again.status == SUCCEEDED and len(post.started) == 2  # the key was released


async def test_a_waiting_caller_still_gets_the_runs_error() -> None:
    post = PostOrder(seconds=0.0)
    post.fail = InvalidArgument("the tool rejected its arguments")
    invoker = invoker_for(post)
    with pytest.raises(InvalidArgument):
        await invoker.invoke(Call("post_order", {}), idempotency_key="k")
    post.fail = None
    again = await invoker.invoke(Call("post_order", {}), idempotency_key="k")
    assert again.status == SUCCEEDED and len(post.started) == 2
