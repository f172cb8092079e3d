"""Coalescing concurrent calls of a batching tool into one backend request.

A tool that declares ``batch: {max_items, max_wait_ms}`` (``Spec.batch_max_items``) gets
its calls gathered here: calls of the same tool (same registry entry, so the same
version and configuration) for the same tenant that arrive within ``max_wait_ms`` of the
first are sent as one request of up to ``max_items`` (a full batch goes at once, the
next call opens a new one). The execution policy runs the request
(``PolicyRunner.run_batch``: breaker, one concurrency slot, retries of the calls that
need one) and each call gets its own outcome back. A call left alone in its window is an
ordinary single call.

Everything that is per call happens before a call gets here and after it leaves:
result cache and single-flight (so only misses are batched), idempotency claims, the
execute_tool span, usage records. A caller that goes away before its batch is sent is
taken out of it; once sent, the request goes on and the result is dropped.

The batch runs in a task of its own, in the tenant's context, with the latest deadline
of its calls (a call whose own deadline is earlier gives up on its own). It is one
``tool_batch {tool}`` span, a child of its first call's span, linked to every call's
span, each of which links back to it. Every request observes ``trellis_tool_batch_size``
and counts ``trellis_tool_batches_total`` and ``trellis_tool_batch_items_total``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import TOOL_BATCH_ITEMS, TOOL_BATCH_SIZE, TOOL_BATCHES
from trellis_toolgateway.execution import PolicyRunner
from trellis_toolgateway.registry import Entry
from trellis_toolgateway.tools.base import BatchItem, CallInfo, Json

log = get_logger(__name__)

NodeOutcome = common_pb2.NodeOutcome
ATTR_BATCH_SIZE = "trellis.batch.size"


@dataclass(eq=False)
class _Call:
    item: BatchItem
    span: trace.Span
    #: When its caller gives up (monotonic; None: never).
    deadline: float | None
    result: asyncio.Future[NodeOutcome]


@dataclass(eq=False)
class _Batch:
    """Calls gathering for one request."""

    entry: Entry
    calls: list[_Call] = field(default_factory=list)
    timer: asyncio.Task[None] | None = None


class Batcher:
    """Gathers calls of batching tools and sends them through ``policy``."""

    def __init__(self, policy: PolicyRunner, tracer: trace.Tracer) -> None:
        self._policy = policy
        self._tracer = tracer
        self._open: dict[tuple[str, int], _Batch] = {}
        #: Requests under way (held so they are not garbage collected).
        self._sending: set[asyncio.Task[None]] = set()

    async def run(
        self, entry: Entry, args: dict[str, Json], call: CallInfo, span: trace.Span
    ) -> NodeOutcome:
        """The outcome of one call, sent with whichever calls join it."""
        spec = entry.tool.spec
        key = (context.tenant(), id(entry))
        left = context.remaining()
        mine = _Call(
            BatchItem(args, call),
            span,
            None if left is None else time.monotonic() + left,
            asyncio.get_running_loop().create_future(),
        )
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(entry)
            batch.timer = asyncio.create_task(self._window(key, batch, spec.batch_max_wait))
        batch.calls.append(mine)
        if len(batch.calls) >= spec.batch_max_items:
            self._send(key, batch)
        try:
            return await asyncio.shield(mine.result)
        except asyncio.CancelledError:
            mine.result.add_done_callback(_unheard)
            if key in self._open and self._open[key] is batch and mine in batch.calls:
                batch.calls.remove(mine)  # not sent yet: the backend never sees it
                if not batch.calls:
                    self._close(key, batch)
            raise

    async def _window(self, key: tuple[str, int], batch: _Batch, wait: float) -> None:
        await asyncio.sleep(wait)
        if self._open.get(key) is batch:
            self._send(key, batch)

    def _close(self, key: tuple[str, int], batch: _Batch) -> None:
        del self._open[key]
        if batch.timer is not None and batch.timer is not asyncio.current_task():
            batch.timer.cancel()

    def _send(self, key: tuple[str, int], batch: _Batch) -> None:
        self._close(key, batch)
        task = asyncio.create_task(self._request(batch.entry, batch.calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _request(self, entry: Entry, calls: Sequence[_Call]) -> None:
        tool = entry.tool.spec.name
        TOOL_BATCH_SIZE.labels(tool=tool).observe(len(calls))
        TOOL_BATCHES.labels(tool=tool).inc()
        TOOL_BATCH_ITEMS.labels(tool=tool).inc(len(calls))
        deadlines = [c.deadline for c in calls]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        timeout = None if latest is None else max(latest - time.monotonic(), 0.0)
        parent = trace.set_span_in_context(calls[0].span)
        try:
            with (
                context.request_scope(timeout=timeout, detached=True),
                self._tracer.start_as_current_span(
                    f"tool_batch {tool}",
                    context=parent,
                    kind=SpanKind.INTERNAL,
                    attributes={"gen_ai.tool.name": tool, ATTR_BATCH_SIZE: len(calls)},
                    links=[Link(c.span.get_span_context()) for c in calls],
                ) as span,
            ):
                for call in calls:
                    call.span.add_link(span.get_span_context(), {ATTR_BATCH_SIZE: len(calls)})
                outcomes = await self._policy.run_batch(entry, [c.item for c in calls], span)
        except BaseException as error:  # a contract violation, a full queue, cancelled
            for call in calls:
                if call.result.done():
                    continue
                if isinstance(error, Exception):
                    call.result.set_exception(error)
                else:
                    call.result.cancel()
            if not isinstance(error, Exception):
                raise
            return
        for call, outcome in zip(calls, outcomes, strict=True):
            if not call.result.done():
                call.result.set_result(outcome)

    async def aclose(self) -> None:
        """Send nothing more; cancel the requests under way (their callers get the error)."""
        for key, batch in list(self._open.items()):
            self._close(key, batch)
            for call in batch.calls:
                call.result.cancel()
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)


def _unheard(result: asyncio.Future[NodeOutcome]) -> None:
    """The result of a call whose caller left: read, so asyncio does not warn about it."""
    if not result.cancelled():
        result.exception()
