"""Dispatch-as-ready DAG execution.

A node starts the moment its last dependency succeeds — no level or superstep
barrier — and nodes start while the plan is still streaming in. Dependents of a
node that did not succeed are SKIPPED; independent branches go on. Concurrency is
bounded per run (and per process through a shared semaphore).

``on_outcome`` sees each outcome as soon as it is known (its write issued) and before any
dependent starts; raising there (the run's cost limit) stops the run: the task group
cancels the nodes in flight and nothing further starts. A node's dependents start while
its outcome is being stored (``_complete``); the events reach the client in order, each
after its write (``events.RunEvents``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.contract.refs import resolve
from trellis.runtime import context
from trellis.runtime.convert import from_struct, from_value, timestamp, to_struct
from trellis.runtime.errors import TrellisError
from trellis.runtime.redact import redact_text
from trellis_executor.plan import NodeChecker

Status = common_pb2.NodeStatus
#: A call the gateway never answered (UNAVAILABLE: it restarted, its replica went away)
#: or could not take (its idempotency store down) is dispatched again, with the same
#: idempotency key, after a backoff (doubling from the first to the cap, jittered),
#: for up to ``redispatch_seconds`` (TRELLIS_GATEWAY_RETRY_SECONDS) and within the
#: run's deadline. A side-effecting call
#: still runs at most once: the gateway answers the repeat with the first outcome (or
#: FAILED IDEMPOTENCY_UNKNOWN when its first gateway died mid-call).
REDISPATCH_CODES = frozenset({"UNAVAILABLE", "IDEMPOTENCY_STORE_UNAVAILABLE"})
REDISPATCH_SECONDS = 20.0
REDISPATCH_BACKOFF = (0.1, 2.0)

#: Runs one (resolved) call and returns its outcome; never raises for a tool failure
#: (raising stops the run: the node is recorded CANCELLED, as when the run is cancelled).
RunNode = Callable[[common_pb2.ToolCall], Awaitable[common_pb2.NodeOutcome]]
#: Told of each outcome before its dependents start; may raise to stop the run.
OnOutcome = Callable[[common_pb2.NodeOutcome], None]


class SchedulerEvents:
    """What the scheduler reports; the runner persists each before the client sees it."""

    async def planned(self, *calls: common_pb2.ToolCall) -> None: ...
    async def started(self, node_id: str) -> None: ...

    def finished(self, outcome: common_pb2.NodeOutcome) -> Awaitable[None]:
        """Issued at once, awaited later: the scheduler goes on while it is stored."""
        return asyncio.sleep(0)


def ended(node_id: str, status: int, code: str, message: str) -> common_pb2.NodeOutcome:
    """An outcome for a node that did not run to completion (skipped, cancelled, ...)."""
    now = timestamp()
    return common_pb2.NodeOutcome(
        node_id=node_id,
        status=status,  # type: ignore[arg-type]
        error=common_pb2.Error(code=code, message=redact_text(message)),
        started_at=now,
        finished_at=now,
    )


class DagScheduler:
    """Runs the nodes of one run; may be fed several plans (replanning rounds)."""

    def __init__(
        self,
        run_node: RunNode,
        events: SchedulerEvents,
        *,
        max_parallel: int,
        process_slots: asyncio.Semaphore | None = None,
        on_outcome: OnOutcome | None = None,
        redispatch_seconds: float = REDISPATCH_SECONDS,
    ) -> None:
        self._run_node = run_node
        self._redispatch_seconds = redispatch_seconds
        self._events = events
        self._on_outcome = on_outcome
        self._slots = asyncio.Semaphore(max_parallel)
        self._process_slots = process_slots or asyncio.Semaphore(max_parallel)
        self.calls: dict[str, common_pb2.ToolCall] = {}
        self.outcomes: dict[str, common_pb2.NodeOutcome] = {}
        self._outputs: dict[str, Any] = {}
        self._waiting: dict[str, set[str]] = {}
        self._dependents: dict[str, list[str]] = {}
        self._group: asyncio.TaskGroup | None = None
        #: Nodes handed to a task, which may be cancelled before it ever runs.
        self._started: list[str] = []

    async def run(self, calls: AsyncIterator[common_pb2.ToolCall], checker: NodeChecker) -> None:
        """Consume ``calls`` and return when every node of them has an outcome."""
        async with self._node_tasks():
            index = 0
            async for call in calls:
                checker.check(call, f"plan[{index}]")
                index += 1
                await self._admit(call)

    @asynccontextmanager
    async def _node_tasks(self) -> AsyncIterator[None]:
        """The task group the nodes run in; when the run stops, the ready nodes whose task
        never got to run (cancelled before it started, or waiting for a slot) are recorded
        as cancelled, so each node the run meant to start reports how it ended."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                yield
        except BaseException:
            await asyncio.shield(self._never_started())
            raise
        finally:
            self._group = None

    async def _never_started(self) -> None:
        await asyncio.sleep(0)  # a cancelled node's own (shielded) record goes first
        for node_id in self._started:
            if node_id not in self.outcomes:
                message = "the run stopped before the node started"
                await self._record(
                    ended(node_id, Status.NODE_STATUS_CANCELLED, "CANCELLED", message)
                )

    async def run_plan(self, calls: Sequence[common_pb2.ToolCall]) -> None:
        """Run a whole plan known up front (an explicit one, already checked and in
        dependency order, and stored with the run's request): its nodes are stored in
        one write, issued before they start as ready but not waited for."""
        if not calls:
            return
        planned = asyncio.ensure_future(self._events.planned(*calls))
        try:
            async with self._node_tasks():
                for call in calls:
                    await self._admit(call, announce=False)
        finally:
            await planned

    async def resume(
        self, plan: Iterable[common_pb2.ToolCall], outcomes: Iterable[common_pb2.NodeOutcome]
    ) -> None:
        """Continue a stored run: nodes with an outcome are done and are not run again;
        the others (in flight when the run stopped, or not started) run now, and this
        returns when every one of them has an outcome. ``plan`` is in planning order."""
        done = {outcome.node_id: outcome for outcome in outcomes}
        async with self._node_tasks():
            for call in plan:
                outcome = done.get(call.node_id)
                if outcome is None:
                    await self._admit(call, announce=False)
                else:
                    self.calls[call.node_id] = call
                    self._remember(outcome)

    async def _admit(self, call: common_pb2.ToolCall, *, announce: bool = True) -> None:
        self.calls[call.node_id] = call
        if announce:
            await self._events.planned(call)
        pending = {d for d in call.depends_on if d not in self.outcomes}
        failed = [d for d in call.depends_on if self._failed(d)]
        for dep in pending:
            self._dependents.setdefault(dep, []).append(call.node_id)
        if failed:
            await self._skip(call.node_id, failed[0])
        elif pending:
            self._waiting[call.node_id] = pending
        else:
            self._start(call)

    def _failed(self, node_id: str) -> bool:
        outcome = self.outcomes.get(node_id)
        return outcome is not None and outcome.status != Status.NODE_STATUS_SUCCEEDED

    def _start(self, call: common_pb2.ToolCall) -> None:
        assert self._group is not None
        self._started.append(call.node_id)
        self._group.create_task(self._execute(call), name=f"node:{call.node_id}")

    def _resolved(self, call: common_pb2.ToolCall) -> common_pb2.ToolCall:
        """``call`` with its references to its dependencies' outputs replaced (a node
        without dependencies has none: the plan checker allows none elsewhere)."""
        if not call.depends_on:
            return call
        args = resolve(from_struct(call.args), self._outputs)
        return common_pb2.ToolCall(
            node_id=call.node_id, tool=call.tool, args=to_struct(args), depends_on=call.depends_on
        )

    async def _execute(self, call: common_pb2.ToolCall) -> None:
        async with self._slots, self._process_slots:
            try:
                resolved = self._resolved(call)
            except TrellisError as error:
                outcome = ended(
                    call.node_id, Status.NODE_STATUS_FAILED, error.reason, error.message
                )
            else:
                await self._events.started(call.node_id)
                try:
                    outcome = await self._dispatch(resolved)
                except BaseException as stop:  # the run stops: cancelled, or out of time
                    cancelled = ended(
                        call.node_id,
                        Status.NODE_STATUS_CANCELLED,
                        "CANCELLED",
                        _stopped_while_running(stop),
                    )
                    await asyncio.shield(self._record(cancelled))
                    raise
        await self._complete(outcome)

    async def _dispatch(self, call: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        """``run_node(call)``, again while the gateway could not be reached (see
        ``REDISPATCH_CODES``); the last outcome when time is up."""
        outcome = await self._run_node(call)
        give_up = time.monotonic() + self._redispatch_seconds
        delay, cap = REDISPATCH_BACKOFF
        while (
            outcome.status == Status.NODE_STATUS_FAILED
            and outcome.error.retryable
            and outcome.error.code in REDISPATCH_CODES
        ):
            pause = random.uniform(delay / 2, delay)
            left = context.remaining()
            if time.monotonic() + pause > give_up or (left is not None and pause >= left):
                break
            await asyncio.sleep(pause)
            delay = min(delay * 2, cap)
            outcome = await self._run_node(call)
        return outcome

    def _remember(self, outcome: common_pb2.NodeOutcome) -> None:
        self.outcomes[outcome.node_id] = outcome
        if outcome.status == Status.NODE_STATUS_SUCCEEDED:
            self._outputs[outcome.node_id] = from_value(outcome.output)

    async def _record(self, outcome: common_pb2.NodeOutcome) -> None:
        self._remember(outcome)
        await self._events.finished(outcome)

    async def _complete(self, outcome: common_pb2.NodeOutcome) -> None:
        """Record the outcome and start what it made ready. Its dependents start while
        the outcome is being stored (the client still sees it first): the store's write
        is off the critical path. A crash in between loses nothing: a node without a
        stored outcome runs again on resume, and writes are stored in the order issued."""
        self._remember(outcome)
        recorded = asyncio.ensure_future(self._events.finished(outcome))
        try:
            if self._on_outcome is not None:
                self._on_outcome(outcome)  # may raise: then no dependent starts
            await self._release(outcome)
        finally:
            await recorded

    async def _release(self, outcome: common_pb2.NodeOutcome) -> None:
        """Start (or skip) the dependents ``outcome`` was the last one they waited for."""
        for dependent in self._dependents.pop(outcome.node_id, []):
            waiting = self._waiting.get(dependent)
            if waiting is None:
                continue  # already skipped
            if outcome.status != Status.NODE_STATUS_SUCCEEDED:
                del self._waiting[dependent]
                await self._skip(dependent, outcome.node_id)
                continue
            waiting.discard(outcome.node_id)
            if not waiting:
                del self._waiting[dependent]
                self._start(self.calls[dependent])

    async def _skip(self, node_id: str, cause: str) -> None:
        self._waiting.pop(node_id, None)
        await self._complete(
            ended(
                node_id,
                Status.NODE_STATUS_SKIPPED,
                "DEPENDENCY_FAILED",
                f"dependency {cause} did not succeed",
            )
        )


def _stopped_while_running(stop: BaseException) -> str:
    if isinstance(stop, TrellisError):
        return f"the run stopped while the node was running ({stop.reason})"
    return "run cancelled while the node was running"
