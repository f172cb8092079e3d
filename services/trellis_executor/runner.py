"""One run, from budget check to answer: plan → dispatch-as-ready → join.

The public entry is ``Runner.run``, an async iterator of RunResponse events. The
run's work happens in its own task (so a client that goes away, or CancelRun,
cancels everything under it) inside a ``trellis.run`` span and a request scope
whose deadline bounds every onward call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.convert import duration
from trellis.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    TrellisError,
)
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import RUN_DURATION
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_executor import ports
from trellis_executor.events import RunEvents, replay
from trellis_executor.limits import Limits
from trellis_executor.plan import NodeChecker, order_explicit_plan
from trellis_executor.scheduler import DagScheduler, ended
from trellis_executor.settings import ExecutorSettings
from trellis_executor.store import RunStore
from trellis_executor.usage import UsageTotals

log = get_logger(__name__)
RunStatus = executor_pb2.RunStatus


@dataclass
class RunContext:
    """What one run's task needs to know."""

    run_id: str
    request: executor_pb2.RunRequest
    limits: Limits
    tools: list[common_pb2.ToolSpec]
    events: RunEvents
    started: float


@dataclass(frozen=True)
class ActiveRun:
    """A run executing in this process, as a second Run with its id finds it."""

    task: asyncio.Task[None]
    events: RunEvents
    trace_id: str
    tenant_id: str


class Runner:
    def __init__(
        self,
        *,
        planner: ports.Planner,
        gateway: ports.Gateway,
        budget: ports.Budget,
        store: RunStore,
        tracer: trace.Tracer,
        settings: ExecutorSettings,
    ) -> None:
        self._planner = planner
        self._gateway = gateway
        self._budget = budget
        self._store = store
        self._tracer = tracer
        self._settings = settings
        self._process_slots = asyncio.Semaphore(settings.max_parallel_process)
        self._active: dict[str, ActiveRun] = {}
        self._tools: dict[str, tuple[float, list[common_pb2.ToolSpec]]] = {}

    # -- public API ---------------------------------------------------------------------

    async def run(
        self, request: executor_pb2.RunRequest
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        """Start a run and stream its events until ``finished``.

        A client-chosen ``run_id`` is idempotent: when that run already exists, the
        caller follows it (from now on if it is running here, replayed if finished)
        instead of starting it twice, so a client can safely retry a dropped Run.
        """
        run_id = request.run_id or uuid.uuid4().hex
        if request.run_id and (existing := await self._existing(run_id)) is not None:
            async for event in existing:
                yield event
            return
        span = self._tracer.start_span(
            "trellis.run",
            attributes={
                "trellis.run_id": run_id,
                "trellis.tenant_id": context.tenant(),
                "gen_ai.operation.name": "invoke_agent",
            },
        )
        with trace.use_span(span, end_on_exit=False, record_exception=False):
            try:
                run = await self._prepare(run_id, request, span)
            except BaseException as error:
                span.record_exception(error)
                span.set_status(trace.StatusCode.ERROR, str(error))
                span.end()
                if not (isinstance(error, AlreadyExists) and request.run_id):
                    raise
                run = None  # a concurrent Run with this id created it first: follow that one
            if run is not None:
                queue = run.events.subscribe()
                task = asyncio.create_task(self._execute(run, span), name=f"run:{run_id}")
        if run is None:
            existing = await self._existing(run_id)
            if existing is None:  # pragma: no cover - created and then gone: cannot happen
                raise AlreadyExists(f"run {run_id} exists", reason="RUN_EXISTS")
            async for event in existing:
                yield event
            return
        trace_id = format(span.get_span_context().trace_id, "032x")
        active = ActiveRun(task, run.events, trace_id, context.tenant())
        self._active[run_id] = active
        task.add_done_callback(lambda _: self._active.pop(run_id, None))
        try:
            yield executor_pb2.RunResponse(
                run_id=run_id, started=executor_pb2.RunStarted(trace_id=trace_id)
            )
            while (event := await queue.get()) is not None:
                yield event
            await asyncio.wait([task])
            if not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]
        finally:
            await self._leave(active, queue)

    async def _existing(self, run_id: str) -> AsyncIterator[executor_pb2.RunResponse] | None:
        """Events of the run ``run_id`` if it exists (None if not): attached or replayed."""
        active = self._active.get(run_id)
        if active is None:
            stored = await self._store.get(run_id)
            if stored is None:
                return None
            active = self._active.get(run_id)  # it may have started here during the await
            if active is None:
                _check_same_tenant(run_id, stored.tenant_id)
                if stored.status == RunStatus.RUN_STATUS_RUNNING:
                    raise FailedPrecondition(
                        f"run {run_id} is running, but not in this executor",
                        reason="RUN_NOT_ACTIVE",
                        metadata={"run_id": run_id},
                    )
                return replay(stored)
        _check_same_tenant(run_id, active.tenant_id)
        # subscribe now, before any await, so no event falls between check and stream
        return self._attach(active, active.events.subscribe())

    async def _attach(
        self, active: ActiveRun, queue: asyncio.Queue[executor_pb2.RunResponse | None]
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        """A second caller of a running run: ``started``, then its events from now on."""
        try:
            yield executor_pb2.RunResponse(
                run_id=active.events.run_id,
                started=executor_pb2.RunStarted(trace_id=active.trace_id),
            )
            while (event := await queue.get()) is not None:
                yield event
        finally:
            await self._leave(active, queue)

    async def _leave(
        self, active: ActiveRun, queue: asyncio.Queue[executor_pb2.RunResponse | None]
    ) -> None:
        """A follower is gone; when it was the last one, cancel everything under the run."""
        active.events.unsubscribe(queue)
        if active.events.subscribers == 0 and not active.task.done():
            active.task.cancel()
            await asyncio.wait([active.task])

    async def get(self, run_id: str) -> executor_pb2.Run:
        run = await self._store.get(run_id)
        if run is None or run.tenant_id != context.tenant():
            raise NotFound(f"no run {run_id}", reason="RUN_NOT_FOUND", metadata={"run_id": run_id})
        return run

    async def cancel(self, run_id: str) -> executor_pb2.RunStatus.ValueType:
        run = await self.get(run_id)
        active = self._active.get(run_id)
        if active is None:
            if run.status == RunStatus.RUN_STATUS_RUNNING:
                raise FailedPrecondition(
                    f"run {run_id} is not running in this executor", reason="RUN_NOT_ACTIVE"
                )
            return run.status
        active.task.cancel()
        await asyncio.wait([active.task])
        return RunStatus.RUN_STATUS_CANCELLED

    # -- one run --------------------------------------------------------------------------

    async def _prepare(
        self, run_id: str, request: executor_pb2.RunRequest, span: trace.Span
    ) -> RunContext:
        """Everything that may reject the run before any event: plan, budget, store."""
        limits = Limits.of(request.options, self._settings)
        tools = await self._catalog()
        if request.plan:
            _check_explicit_plan(request.plan, tools, limits.max_nodes)
        budget = await self._budget.check_budget(0)
        if not budget.allowed:
            raise ResourceExhausted(
                f"tenant {context.tenant()} is over its daily budget",
                reason="BUDGET_EXCEEDED",
                metadata={"limit_nano_usd": str(budget.daily_limit_nano_usd)},
            )
        trace_id = format(span.get_span_context().trace_id, "032x")
        await self._store.create(run_id, context.tenant(), request, trace_id)
        return RunContext(
            run_id, request, limits, tools, RunEvents(run_id, self._store), time.monotonic()
        )

    async def _execute(self, run: RunContext, span: trace.Span) -> None:
        """The run's task: always ends with a persisted ``finished`` event."""
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                with context.request_scope(timeout=run.limits.timeout):
                    async with asyncio.timeout(run.limits.timeout):
                        finished = await self._plan_dispatch_join(run)
            except TimeoutError:
                finished = _failed(
                    "DEADLINE_EXCEEDED", f"run exceeded its deadline of {run.limits.timeout:g}s"
                )
            except TrellisError as error:
                finished = _failed(error.reason, error.message)
            except asyncio.CancelledError:
                finished = executor_pb2.RunFinished(
                    status=RunStatus.RUN_STATUS_CANCELLED,
                    error=common_pb2.Error(code="CANCELLED", message="run cancelled"),
                )
                await asyncio.shield(self._finish(run, finished, span))
                raise
            except Exception as error:
                log.exception("run failed", run_id=run.run_id)
                finished = _failed("INTERNAL", f"internal error ({type(error).__name__})")
            await self._finish(run, finished, span)

    async def _finish(
        self, run: RunContext, finished: executor_pb2.RunFinished, span: trace.Span
    ) -> None:
        elapsed = time.monotonic() - run.started
        finished.duration.CopyFrom(duration(elapsed))
        status = RunStatus.Name(finished.status).removeprefix("RUN_STATUS_").lower()
        RUN_DURATION.labels(status=status).observe(elapsed)
        span.set_attribute("trellis.run_status", status)
        if finished.status != RunStatus.RUN_STATUS_SUCCEEDED:
            span.set_status(trace.StatusCode.ERROR, finished.error.message)
        await run.events.run_finished(finished)

    async def _plan_dispatch_join(self, run: RunContext) -> executor_pb2.RunFinished:
        usage = UsageTotals(run.limits.model)
        scheduler = DagScheduler(
            lambda call: self._invoke(run, call),
            run.events,
            max_parallel=run.limits.max_parallel,
            process_slots=self._process_slots,
        )
        tool_names = [t.name for t in run.tools]
        if run.request.plan:  # explicit plan: no planner, no join
            ordered = [call for _, call in order_explicit_plan(run.request.plan)]
            await scheduler.run(_aiter(ordered), NodeChecker(tool_names, run.limits.max_nodes))
            return self._succeeded(scheduler, usage, answer="")
        answer, reason = "", ""
        for round_ in range(run.limits.max_replans + 1):
            checker = NodeChecker(tool_names, run.limits.max_nodes, seen=scheduler.calls)
            await scheduler.run(self._plan(run, scheduler, usage, round_, reason), checker)
            decision, answer, reason = await self._join(run, scheduler, usage, round_)
            if decision != planner_pb2.JOIN_DECISION_REPLAN:
                break
            log.info("replanning", run_id=run.run_id, round=round_ + 1, reason=reason)
        return self._succeeded(scheduler, usage, answer)

    async def _plan(
        self,
        run: RunContext,
        scheduler: DagScheduler,
        usage: UsageTotals,
        round_: int,
        replan_reason: str,
    ) -> AsyncIterator[common_pb2.ToolCall]:
        request = planner_pb2.PlanRequest(
            run_id=run.run_id,
            goal=run.request.goal,
            tools=run.tools,
            max_nodes=run.limits.max_nodes,
            model=run.limits.model,
            round=round_,
            previous_plan=list(scheduler.calls.values()),
            previous_outcomes=list(scheduler.outcomes.values()),
            replan_reason=replan_reason,
        )
        async for response in self._planner.plan(request):
            if response.HasField("node"):
                yield response.node
            else:
                usage.add(response.done.usage)

    async def _join(
        self, run: RunContext, scheduler: DagScheduler, usage: UsageTotals, round_: int
    ) -> tuple[int, str, str]:
        request = planner_pb2.JoinRequest(
            run_id=run.run_id,
            goal=run.request.goal,
            plan=list(scheduler.calls.values()),
            outcomes=list(scheduler.outcomes.values()),
            model=run.limits.model,
            round=round_,
            allow_replan=round_ < run.limits.max_replans,
        )
        parts: list[str] = []
        decision, reason = planner_pb2.JOIN_DECISION_FINISH, ""
        async for response in self._planner.join(request):
            if response.HasField("done"):
                usage.add(response.done.usage)
                decision, reason = response.done.decision, response.done.reason
            else:
                parts.append(response.answer_delta)
                run.events.answer(response.answer_delta)
        return decision, "".join(parts), reason

    async def _invoke(self, run: RunContext, call: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        request = toolgateway_pb2.InvokeToolRequest(
            call=call,
            run_id=run.run_id,
            idempotency_key=f"{run.run_id}/{call.node_id}",
            cache_mode=run.limits.cache_mode,  # type: ignore[arg-type]
        )
        try:
            return await self._gateway.invoke(request)
        except TrellisError as error:
            outcome = ended(
                call.node_id, common_pb2.NODE_STATUS_FAILED, error.reason, error.message
            )
            outcome.error.retryable = error.retryable
            outcome.attempts = 1
            return outcome

    def _succeeded(
        self, scheduler: DagScheduler, usage: UsageTotals, answer: str
    ) -> executor_pb2.RunFinished:
        outcomes = scheduler.outcomes.values()
        return executor_pb2.RunFinished(
            status=RunStatus.RUN_STATUS_SUCCEEDED,
            answer=answer,
            usage=usage.total(),
            cost_nano_usd=usage.cost_nano_usd + sum(o.cost_nano_usd for o in outcomes),
            cache_hits=sum(1 for o in outcomes if o.cache_hit),
        )

    async def _catalog(self) -> list[common_pb2.ToolSpec]:
        """The gateway's tools, reused for ``tools_cache_seconds`` per tenant."""
        tenant, now = context.tenant(), time.monotonic()
        cached = self._tools.get(tenant)
        if cached is None or now - cached[0] > self._settings.tools_cache_seconds:
            cached = (now, await self._gateway.list_tools())
            self._tools[tenant] = cached
        return cached[1]


def _check_same_tenant(run_id: str, tenant_id: str) -> None:
    """Another tenant's run id is taken, but its run is not theirs to follow."""
    if tenant_id != context.tenant():
        raise AlreadyExists(f"run {run_id} exists", reason="RUN_EXISTS")


def _failed(code: str, message: str) -> executor_pb2.RunFinished:
    return executor_pb2.RunFinished(
        status=RunStatus.RUN_STATUS_FAILED, error=common_pb2.Error(code=code, message=message)
    )


def _check_explicit_plan(
    plan: Sequence[common_pb2.ToolCall], tools: Sequence[common_pb2.ToolSpec], max_nodes: int
) -> None:
    """Reject a bad explicit plan before anything runs."""
    checker = NodeChecker([t.name for t in tools], max_nodes)
    for index, call in order_explicit_plan(plan):
        checker.check(call, f"plan[{index}]")


async def _aiter(calls: Sequence[common_pb2.ToolCall]) -> AsyncIterator[common_pb2.ToolCall]:
    for call in calls:
        yield call
