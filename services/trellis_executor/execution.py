"""Executing one run: plan → dispatch-as-ready → join, to a persisted ``finished``.

gRPC-free like the runner above it, which owns runs (start, resume, follow, leases)
and hands each one's task here. Everything the run does happens inside its
``trellis.run`` span and a request scope whose deadline bounds every onward call.

The run is held to its limits (``limits.py``): its plan size (``NodeChecker``), its
replanning rounds, its deadline, and its cost: every model call's usage and every
node's outcome is charged to a ``CostMeter`` as it arrives, and the charge that goes
over ``max_cost_nano_usd`` stops the run (FAILED, RUN_COST_EXCEEDED).

However the run ends, its ``finished`` carries what it really used and cost
(``run_cost.py``: model tools' nodes included), and its status is true: a run that
reached its end is judged by ``ending.py`` (SUCCEEDED, PARTIAL, FAILED); one that
stopped says why (its deadline passed: FAILED DEADLINE_EXCEEDED with the nodes in
flight CANCELLED; cancelled: CANCELLED; anything else: FAILED with the error's reason).

Plan formats (the planner chooses one per run and says so first on the Plan stream; the
run keeps it in its progress and sends it back on every Plan and Join): with
``tool_calls`` the model's text beside its calls is part of the answer (``answer_delta``
on the Plan stream too), a plan that answered instead of calling tools needs no join,
and a join may stream the next round's nodes instead of an answer: they are dispatched
as they arrive, as round + 1, without another Plan call. A join no model could answer
(``fallback_answer.py``) still answers, from the outcomes.

A turn of a session (``RunRequest.session_id``) first reads its context from the run
store (``sessions.py``: folded by the planner's Summarize when over budget, that model
call charged to the run like its plan) and sends it with every Plan and Join; a resumed
turn reads it again. The run's onward calls carry the session id, for the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.convert import duration
from trellis.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TrellisError,
    Unauthenticated,
)
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import RUN_DURATION
from trellis.runtime.redact import redact_details, redact_text
from trellis.runtime.rpc_spans import call_attributes
from trellis.runtime.usage import node_model_usage_id
from trellis.runtime.validation import node_idempotency_key
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_executor import ports
from trellis_executor.ending import judged, unrecovered_failures
from trellis_executor.events import RunEvents
from trellis_executor.fallback_answer import fallback_answer, no_model_answered
from trellis_executor.limits import DEADLINE_EXCEEDED, CostMeter, Limits, RunDeadlineExceeded
from trellis_executor.plan import NodeChecker, order_explicit_plan
from trellis_executor.run_cost import RunCost, tool_cost
from trellis_executor.run_span import run_totals
from trellis_executor.scheduler import DagScheduler, ended
from trellis_executor.sessions import Sessions
from trellis_executor.store import Progress

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
    #: When the run started (monotonic; for a resumed run, when it was first created).
    started: float
    progress: Progress = field(default_factory=Progress)
    #: The stored run this replica resumes (None for a run started here).
    restored: executor_pb2.Run | None = None
    resumes: int = 0
    #: What the run used and spent so far, and its nodes: set when its task starts.
    cost: RunCost | None = None
    meter: CostMeter | None = None
    scheduler: DagScheduler | None = None
    #: Every answer piece sent to the client (narration of tool-call rounds included).
    answer: list[str] = field(default_factory=list)
    #: The earlier turns of the run's session (None: no session, or its first turn).
    session: planner_pb2.SessionContext | None = None

    @property
    def deadline(self) -> float:
        """When the run's time is up (monotonic)."""
        return self.started + self.limits.timeout

    @functools.cached_property
    def model_tools(self) -> frozenset[str]:
        """The tools whose calls spend model tokens (their nodes report them)."""
        return frozenset(tool.name for tool in self.tools if tool.calls_model)


class RunExecution:
    """Runs a prepared run's task with the planner and the gateway."""

    def __init__(
        self,
        *,
        planner: ports.Planner,
        gateway: ports.Gateway,
        ledger: ports.Ledger,
        process_slots: asyncio.Semaphore,
        gateway_retry_seconds: float,
        sessions: Sessions | None = None,
    ) -> None:
        self._sessions = sessions
        self._planner = planner
        self._gateway = gateway
        self._ledger = ledger
        self._process_slots = process_slots
        self._gateway_retry_seconds = gateway_retry_seconds

    async def execute(self, run: RunContext, span: trace.Span) -> None:
        """The run's task: ends with a persisted ``finished`` event, unless the run moved
        to another replica (then nothing more is written from here). Once the run knows
        how it ended, that ending is written even if the task is cancelled meanwhile."""
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                try:
                    finished = await self._outcome(run)
                except asyncio.CancelledError:
                    if not run.events.lost:
                        cancelled = _stopped("CANCELLED", "run cancelled")
                        cancelled.status = RunStatus.RUN_STATUS_CANCELLED
                        await asyncio.shield(self._finish(run, cancelled, span))
                    raise
                if finished is None:
                    span.set_attribute("trellis.run_status", "moved")
                else:
                    await asyncio.shield(self._finish(run, finished, span))
            finally:
                run.events.close()

    async def _outcome(self, run: RunContext) -> executor_pb2.RunFinished | None:
        """How the run ended (None: it moved to another replica)."""
        try:
            left = run.deadline - time.monotonic()
            session_id = run.request.session_id or None
            with context.request_scope(timeout=left, session_id=session_id):
                async with asyncio.timeout(left):
                    return await self._plan_dispatch_join(run)
        except Exception as raised:
            if run.events.lost:
                return None
            error = _primary(raised)
            if isinstance(error, TimeoutError) or (
                isinstance(error, TrellisError) and error.reason == DEADLINE_EXCEEDED
            ):
                return _stopped(
                    DEADLINE_EXCEEDED, f"run exceeded its deadline of {run.limits.timeout:g}s"
                )
            if isinstance(error, TrellisError):
                if isinstance(error, InvalidArgument):
                    run.events.rejection = error  # the caller gets it as the call's status
                stopped = _stopped(error.reason, error.message, error.metadata)
                stopped.error.retryable = error.retryable  # e.g. a model that was unavailable
                return stopped
            log.exception("run failed", run_id=run.run_id)
            return _stopped("INTERNAL", f"internal error ({type(error).__name__})")

    async def _finish(
        self, run: RunContext, finished: executor_pb2.RunFinished, span: trace.Span
    ) -> None:
        await self._account(run, finished)
        scheduler = run.scheduler
        span.set_attributes(
            run_totals(
                finished,
                len(scheduler.calls) if scheduler is not None else 0,
                scheduler.outcomes.values() if scheduler is not None else (),
            )
        )
        elapsed = time.monotonic() - run.started
        finished.duration.CopyFrom(duration(elapsed))
        status = RunStatus.Name(finished.status).removeprefix("RUN_STATUS_").lower()
        RUN_DURATION.labels(status=status).observe(elapsed)
        span.set_attribute("trellis.run_status", status)
        if finished.status != RunStatus.RUN_STATUS_SUCCEEDED:
            span.set_status(trace.StatusCode.ERROR, finished.error.message)
        await run.events.run_finished(finished)

    async def _account(self, run: RunContext, finished: executor_pb2.RunFinished) -> None:
        """What the run used and cost, its cache hits and unrecovered failures."""
        scheduler = run.scheduler
        outcomes = scheduler.outcomes if scheduler is not None else {}
        if run.cost is not None:
            await run.cost.settle(self._ledger, run.run_id)
            finished.usage.CopyFrom(run.cost.model_usage())
        finished.cost_nano_usd = finished.usage.cost_nano_usd + tool_cost(outcomes.values())
        finished.cache_hits = sum(1 for o in outcomes.values() if o.cache_hit)
        if scheduler is not None:
            failures = unrecovered_failures(scheduler.calls, outcomes, run.progress.round_starts)
            finished.failed_nodes = len(failures)

    async def _plan_dispatch_join(self, run: RunContext) -> executor_pb2.RunFinished:
        restored = run.restored
        cost = run.cost = RunCost(
            run.limits.model, earlier=run.progress.usage if restored is not None else None
        )
        meter = run.meter = CostMeter(run.limits.max_cost_nano_usd)
        meter.spent_nano_usd = cost.model_usage().cost_nano_usd
        if restored is not None:  # what the run spent before it moved here
            meter.spent_nano_usd += tool_cost(restored.outcomes)
            meter.check("resuming")
        scheduler = run.scheduler = DagScheduler(
            lambda call: self._invoke(run, call),
            run.events,
            max_parallel=run.limits.max_parallel,
            process_slots=self._process_slots,
            on_outcome=lambda outcome: meter.charge(
                outcome.cost_nano_usd + outcome.usage.cost_nano_usd, f"node {outcome.node_id}"
            ),
            redispatch_seconds=self._gateway_retry_seconds,
        )
        if restored is not None:
            await scheduler.resume(restored.plan, restored.outcomes)
        if run.request.plan:  # explicit plan: no planner, no join
            ordered = [call for _, call in order_explicit_plan(run.request.plan)]
            # checked in _prepare; on a resume, the nodes not stored before the crash
            await scheduler.run_plan([c for c in ordered if c.node_id not in scheduler.calls])
            failures = unrecovered_failures(scheduler.calls, scheduler.outcomes)
            return judged(explicit=True, failures=failures, calls=scheduler.calls, answer="")
        if run.request.session_id and self._sessions is not None:
            run.session = await self._sessions.context_of(
                run.run_id,
                run.request.session_id,
                model=run.limits.model,
                attempt=run.resumes,
                charge=lambda report: self._model_call(run, report, "session summary"),
            )
        if run.progress.plan_format:
            span_format(run.progress.plan_format)
        while True:
            progress = run.progress
            round_ = progress.round
            # A resumed round whose plan had begun streaming keeps the nodes it stored
            # as its plan; the join sees their outcomes and may ask for another round.
            if not progress.joining and len(scheduler.calls) == progress.round_start:
                planned = _Planned()
                plan = self._plan(run, scheduler, round_, progress.replan_reason, planned)
                await scheduler.run(plan, self._checker(run, scheduler))
                if planned.answered:  # tool_calls: the model answered instead of calling
                    return self._judged(run, scheduler)
            progress = run.progress
            await self._save(run, replace(progress, joining=True, usage=cost.model_usage()))
            joined = _Joined()
            try:
                async with aclosing(self._join(run, scheduler, round_, joined)) as nodes:
                    first = await anext(nodes, None)
                    if first is not None:  # tool_calls: the model called the next round's tools
                        await self._next_round(run, scheduler, round_, joined.reason)
                        await scheduler.run(_chain(first, nodes), self._checker(run, scheduler))
                        continue
            except TrellisError as error:
                if joined.nodes or not no_model_answered(error):
                    raise
                return self._unanswered(run, scheduler, error)
            if joined.decision != planner_pb2.JOIN_DECISION_REPLAN or (
                round_ >= run.limits.max_replans
            ):
                return self._judged(run, scheduler)
            log.info("replanning", run_id=run.run_id, round=round_ + 1, reason=joined.reason)
            await self._next_round(run, scheduler, round_, joined.reason)

    def _checker(self, run: RunContext, scheduler: DagScheduler) -> NodeChecker:
        tool_names = [t.name for t in run.tools]
        return NodeChecker(tool_names, run.limits.max_nodes, seen=scheduler.calls)

    async def _next_round(
        self, run: RunContext, scheduler: DagScheduler, round_: int, reason: str
    ) -> None:
        """Save that round ``round_ + 1`` begins with the next node."""
        assert run.cost is not None
        start = len(scheduler.calls)
        progress = run.progress
        await self._save(
            run,
            replace(
                progress,
                round=round_ + 1,
                joining=False,
                round_start=start,
                replan_reason=reason,
                usage=run.cost.model_usage(),
                round_starts=(*progress.round_starts, start),
            ),
        )

    def _judged(self, run: RunContext, scheduler: DagScheduler) -> executor_pb2.RunFinished:
        failures = unrecovered_failures(
            scheduler.calls, scheduler.outcomes, run.progress.round_starts
        )
        return judged(
            explicit=False, failures=failures, calls=scheduler.calls, answer="".join(run.answer)
        )

    def _unanswered(
        self, run: RunContext, scheduler: DagScheduler, error: TrellisError
    ) -> executor_pb2.RunFinished:
        """The join failed for want of a model: answer from the outcomes (PARTIAL)."""
        log.warning(
            "no model could answer: the run answers with its tool results",
            run_id=run.run_id,
            reason=error.reason,
        )
        text = fallback_answer(error, scheduler.calls, scheduler.outcomes)
        self._answer(run, ("\n\n" if run.answer else "") + text)
        failures = unrecovered_failures(
            scheduler.calls, scheduler.outcomes, run.progress.round_starts
        )
        return judged(
            explicit=False,
            failures=failures,
            calls=scheduler.calls,
            answer="".join(run.answer),
            unanswered=error,
        )

    @staticmethod
    def _answer(run: RunContext, text: str) -> None:
        run.answer.append(text)
        run.events.answer(text)

    async def _save(self, run: RunContext, progress: Progress) -> None:
        run.progress = progress
        await run.events.progress(progress)

    def _model_call(self, run: RunContext, report: planner_pb2.ModelCallUsage, what: str) -> None:
        """A planner's report of one model call: counted, and charged to the run's cap."""
        assert run.cost is not None and run.meter is not None
        run.meter.charge(run.cost.model_call(report), what)

    async def _plan(
        self,
        run: RunContext,
        scheduler: DagScheduler,
        round_: int,
        replan_reason: str,
        planned: _Planned,
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
            plan_format=run.progress.plan_format,  # type: ignore[arg-type]
            round_starts=run.progress.round_starts,
            session=run.session,
        )
        async for response in self._planner.plan(request):
            event = response.WhichOneof("event")
            if event == "node":
                yield response.node
            elif event == "usage":
                self._model_call(run, response.usage, f"planning round {round_}")
            elif event == "answer_delta":
                self._answer(run, response.answer_delta)
            elif event == "started":
                await self._keep_format(run, response.started.plan_format)
            elif event == "done":
                planned.answered = response.done.answered

    async def _keep_format(self, run: RunContext, plan_format: int) -> None:
        """The run's plan format, once the planner chose it: saved, on the run's span."""
        if plan_format and not run.progress.plan_format:
            span_format(plan_format)
            await self._save(run, replace(run.progress, plan_format=plan_format))

    async def _join(
        self, run: RunContext, scheduler: DagScheduler, round_: int, joined: _Joined
    ) -> AsyncIterator[common_pb2.ToolCall]:
        """The join's answer goes to the client; the next round's nodes (tool_calls) are
        yielded as they stream; the decision lands in ``joined``."""
        allow_replan = round_ < run.limits.max_replans
        request = planner_pb2.JoinRequest(
            run_id=run.run_id,
            goal=run.request.goal,
            plan=list(scheduler.calls.values()),
            outcomes=list(scheduler.outcomes.values()),
            model=run.limits.model,
            round=round_,
            allow_replan=allow_replan,
            attempt=run.resumes,
            plan_format=run.progress.plan_format,  # type: ignore[arg-type]
            round_starts=run.progress.round_starts,
            tools=run.tools,
            max_nodes=run.limits.max_nodes,
            session=run.session,
        )
        async for response in self._planner.join(request):
            event = response.WhichOneof("event")
            if event == "done":
                joined.decision, joined.reason = response.done.decision, response.done.reason
            elif event == "usage":
                self._model_call(run, response.usage, f"joining round {round_}")
            elif event == "answer_delta":
                self._answer(run, response.answer_delta)
            elif event == "node" and allow_replan:
                joined.nodes += 1
                yield response.node

    async def _invoke(self, run: RunContext, call: common_pb2.ToolCall) -> common_pb2.NodeOutcome:
        """The node's outcome; raises ``RunDeadlineExceeded`` when the run's deadline cut
        the call short (the node is then CANCELLED and the run stops, never FAILED)."""
        request = toolgateway_pb2.InvokeToolRequest(
            call=call,
            run_id=run.run_id,
            idempotency_key=node_idempotency_key(run.run_id, call.node_id),
            cache_mode=run.limits.cache_mode,  # type: ignore[arg-type]
        )
        assert run.cost is not None
        usage_id = node_model_usage_id(run.run_id, call.node_id)
        try:
            with call_attributes({"trellis.node_id": call.node_id, "gen_ai.tool.name": call.tool}):
                outcome = await self._gateway.invoke(request)
        except BaseException as error:
            if call.tool in run.model_tools and _may_have_run(error):
                run.cost.node_unreported(usage_id)  # its model call may have been made
            if not isinstance(error, TrellisError):
                raise
            if error.reason == DEADLINE_EXCEEDED:
                raise _deadline(run) from error
            outcome = ended(
                call.node_id, common_pb2.NODE_STATUS_FAILED, error.reason, error.message
            )
            outcome.error.retryable = error.retryable
            outcome.attempts = 1
            return outcome
        run.cost.node_usage(usage_id, outcome.usage)
        if outcome.status == common_pb2.NODE_STATUS_FAILED and (
            outcome.error.code == DEADLINE_EXCEEDED
        ):
            raise _deadline(run)
        return outcome


#: Errors of an InvokeTool that refused the call: the tool never ran.
_REFUSALS = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
)


def _may_have_run(error: BaseException) -> bool:
    """Whether a failed InvokeTool may have run the tool (cancelled, cut, unanswered)."""
    return not isinstance(error, _REFUSALS)


@dataclass
class _Planned:
    """What a Plan stream said besides its nodes."""

    answered: bool = False


@dataclass
class _Joined:
    """How a Join stream ended, and how many next-round nodes it streamed."""

    decision: int = planner_pb2.JOIN_DECISION_FINISH
    reason: str = ""
    nodes: int = 0


async def _chain(
    first: common_pb2.ToolCall, rest: AsyncIterator[common_pb2.ToolCall]
) -> AsyncIterator[common_pb2.ToolCall]:
    yield first
    async for call in rest:
        yield call


def span_format(plan_format: int) -> None:
    """Put the run's plan format on its span (the current one)."""
    name = common_pb2.PlanFormat.Name(plan_format).removeprefix("PLAN_FORMAT_").lower()  # type: ignore[arg-type]
    trace.get_current_span().set_attribute("trellis.plan_format", name)


def _deadline(run: RunContext) -> RunDeadlineExceeded:
    return RunDeadlineExceeded(f"run exceeded its deadline of {run.limits.timeout:g}s")


def _primary(error: BaseException) -> BaseException:
    """The error that ended a run: the Trellis error inside a task group's, if any."""
    while isinstance(error, BaseExceptionGroup):
        trellis = error.subgroup(TrellisError)
        error = (trellis or error).exceptions[0]
    return error


def _stopped(
    code: str, message: str, details: dict[str, str] | None = None
) -> executor_pb2.RunFinished:
    """The ``finished`` of a run that stopped before its end (FAILED unless changed);
    its error is redacted like any error handed out. Usage and cost are added later."""
    error = common_pb2.Error(
        code=code, message=redact_text(message), details=redact_details(details or {})
    )
    return executor_pb2.RunFinished(status=RunStatus.RUN_STATUS_FAILED, error=error)
