"""Executing one run: plan → dispatch-as-ready → join, to a persisted ``finished``.

gRPC-free like the runner above it, which owns runs (start, resume, follow, leases)
and hands each one's task here. Everything the run does happens inside its
``trellis.run`` span and a request scope whose deadline bounds every onward call.

The run is held to its limits (``limits.py``): its plan size (``NodeChecker``), its
replanning rounds, its duration (``asyncio.timeout``), and its cost: every model call's
usage and every node's outcome is charged to a ``CostMeter`` as it arrives, and the
charge that goes over ``max_cost_nano_usd`` stops the run (FAILED, RUN_COST_EXCEEDED).
A run that does not succeed still reports what it cost and the tokens it used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.convert import duration
from trellis.runtime.errors import InvalidArgument, TrellisError
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import RUN_DURATION
from trellis.runtime.redact import redact_details, redact_text
from trellis.runtime.validation import node_idempotency_key
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_executor import ports
from trellis_executor.events import RunEvents
from trellis_executor.limits import CostMeter, Limits
from trellis_executor.plan import NodeChecker, order_explicit_plan
from trellis_executor.scheduler import DagScheduler, ended
from trellis_executor.store import Progress
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
    progress: Progress = field(default_factory=Progress)
    #: The stored run this replica resumes (None for a run started here).
    restored: executor_pb2.Run | None = None
    resumes: int = 0
    #: Model usage and cost so far, set when the run's task starts.
    usage: UsageTotals | None = None
    meter: CostMeter | None = None


class RunExecution:
    """Runs a prepared run's task with the planner and the gateway."""

    def __init__(
        self, *, planner: ports.Planner, gateway: ports.Gateway, process_slots: asyncio.Semaphore
    ) -> None:
        self._planner = planner
        self._gateway = gateway
        self._process_slots = process_slots

    async def execute(self, run: RunContext, span: trace.Span) -> None:
        """The run's task: ends with a persisted ``finished`` event, unless the run moved
        to another replica (then nothing more is written from here)."""
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                try:
                    finished = await self._outcome(run)
                except asyncio.CancelledError:
                    if not run.events.lost:
                        cancelled = executor_pb2.RunFinished(
                            status=RunStatus.RUN_STATUS_CANCELLED,
                            error=common_pb2.Error(code="CANCELLED", message="run cancelled"),
                        )
                        _spent(run, cancelled)
                        await asyncio.shield(self._finish(run, cancelled, span))
                    raise
                if finished is None:
                    span.set_attribute("trellis.run_status", "moved")
                else:
                    await self._finish(run, finished, span)
            finally:
                run.events.close()

    async def _outcome(self, run: RunContext) -> executor_pb2.RunFinished | None:
        """How the run ended (None: it moved to another replica)."""
        try:
            with context.request_scope(timeout=run.limits.timeout):
                async with asyncio.timeout(run.limits.timeout):
                    return await self._plan_dispatch_join(run)
        except Exception as raised:
            if run.events.lost:
                return None
            error = _primary(raised)
            if isinstance(error, TimeoutError):
                finished = _failed(
                    "DEADLINE_EXCEEDED", f"run exceeded its deadline of {run.limits.timeout:g}s"
                )
            elif isinstance(error, TrellisError):
                if isinstance(error, InvalidArgument):
                    run.events.rejection = error  # the caller gets it as the call's status
                finished = _failed(error.reason, error.message, error.metadata)
            else:
                log.exception("run failed", run_id=run.run_id)
                finished = _failed("INTERNAL", f"internal error ({type(error).__name__})")
            _spent(run, finished)
            return finished

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
        usage = run.usage = UsageTotals(run.limits.model)
        usage.add(run.progress.usage)
        meter = run.meter = CostMeter(run.limits.max_cost_nano_usd)
        meter.spent_nano_usd = usage.cost_nano_usd
        if run.restored is not None:  # what the run spent before it moved here
            meter.spent_nano_usd += sum(o.cost_nano_usd for o in run.restored.outcomes)
            meter.check("resuming")
        scheduler = DagScheduler(
            lambda call: self._invoke(run, call),
            run.events,
            max_parallel=run.limits.max_parallel,
            process_slots=self._process_slots,
            on_outcome=lambda outcome: meter.charge(
                outcome.cost_nano_usd, f"node {outcome.node_id}"
            ),
        )
        if run.restored is not None:
            await scheduler.resume(run.restored.plan, run.restored.outcomes)
        tool_names = [t.name for t in run.tools]
        if run.request.plan:  # explicit plan: no planner, no join
            ordered = [call for _, call in order_explicit_plan(run.request.plan)]
            # checked in _prepare; on a resume, the nodes not stored before the crash
            await scheduler.run_plan([c for c in ordered if c.node_id not in scheduler.calls])
            return self._succeeded(scheduler, usage, answer="")
        progress = run.progress
        while True:
            round_ = progress.round
            # A resumed round whose plan had begun streaming keeps the nodes it stored
            # as its plan; the join sees their outcomes and may ask for another round.
            if not progress.joining and len(scheduler.calls) == progress.round_start:
                checker = NodeChecker(tool_names, run.limits.max_nodes, seen=scheduler.calls)
                plan = self._plan(run, scheduler, usage, round_, progress.replan_reason)
                await scheduler.run(plan, checker)
            progress = replace(progress, joining=True, usage=usage.total())
            await run.events.progress(progress)
            decision, answer, reason = await self._join(run, scheduler, usage, round_)
            if decision != planner_pb2.JOIN_DECISION_REPLAN or round_ >= run.limits.max_replans:
                return self._succeeded(scheduler, usage, answer)
            log.info("replanning", run_id=run.run_id, round=round_ + 1, reason=reason)
            progress = Progress(round_ + 1, False, len(scheduler.calls), reason, usage.total())
            await run.events.progress(progress)

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
            attempt=run.resumes,
        )
        async for response in self._planner.plan(request):
            if response.HasField("node"):
                yield response.node
            else:
                usage.add(response.done.usage)
                if run.meter is not None:
                    run.meter.charge(response.done.usage.cost_nano_usd, f"planning round {round_}")

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
            attempt=run.resumes,
        )
        parts: list[str] = []
        decision, reason = planner_pb2.JOIN_DECISION_FINISH, ""
        async for response in self._planner.join(request):
            if response.HasField("done"):
                usage.add(response.done.usage)
                decision, reason = response.done.decision, response.done.reason
                if run.meter is not None:
                    run.meter.charge(response.done.usage.cost_nano_usd, f"joining round {round_}")
            else:
                parts.append(response.answer_delta)
                run.events.answer(response.answer_delta)
        return decision, "".join(parts), reason

    async def _invoke(self, run: RunContext, call: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        request = toolgateway_pb2.InvokeToolRequest(
            call=call,
            run_id=run.run_id,
            idempotency_key=node_idempotency_key(run.run_id, call.node_id),
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


def _primary(error: BaseException) -> BaseException:
    """The error that ended a run: the Trellis error inside a task group's, if any."""
    while isinstance(error, BaseExceptionGroup):
        trellis = error.subgroup(TrellisError)
        error = (trellis or error).exceptions[0]
    return error


def _failed(
    code: str, message: str, details: dict[str, str] | None = None
) -> executor_pb2.RunFinished:
    """A FAILED run's ``finished``; its error is redacted like any error handed out."""
    error = common_pb2.Error(
        code=code, message=redact_text(message), details=redact_details(details or {})
    )
    return executor_pb2.RunFinished(status=RunStatus.RUN_STATUS_FAILED, error=error)


def _spent(run: RunContext, finished: executor_pb2.RunFinished) -> None:
    """What a run that did not succeed used and cost up to its end."""
    if run.usage is not None:
        finished.usage.CopyFrom(run.usage.total())
    if run.meter is not None:
        finished.cost_nano_usd = run.meter.spent_nano_usd
