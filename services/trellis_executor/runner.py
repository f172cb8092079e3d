"""The executor's runs: starting, following, cancelling, resuming them.

The public entry is ``Runner.run``, an async iterator of RunResponse events. Each
run's work (``execution.py``) happens in its own task, so a client that goes away,
or CancelRun, cancels everything under it.

Durability: a run is owned through a lease in the store (``leases.py``). A replica
resumes runs whose owner died, and its own runs after a restart, from the stored
plan, outcomes and progress: completed nodes are not run again, the others run
with the same idempotency key. Run (same run_id) and ResumeRun attach to a run
executing here, resume it if nobody holds it, or follow it in the store.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from trellis.clients.budget_check import BudgetPolicy, require_budget
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.convert import duration, timestamp_seconds
from trellis.runtime.errors import (
    AlreadyExists,
    NotFound,
    ResourceExhausted,
    TrellisError,
    Unavailable,
)
from trellis.runtime.logs import get_logger
from trellis.runtime.telemetry import span_id_of, trace_id_of
from trellis_executor import ports
from trellis_executor.events import Queue, RunEvents
from trellis_executor.execution import RunContext, RunExecution
from trellis_executor.follow import StoredEvents, follow_stored
from trellis_executor.leases import LeaseKeeper
from trellis_executor.limits import Limits
from trellis_executor.plan import NodeChecker, order_explicit_plan
from trellis_executor.run_list import PageTokens, list_page
from trellis_executor.sessions import Sessions
from trellis_executor.settings import ExecutorSettings
from trellis_executor.store import RunStore

log = get_logger(__name__)
RunStatus = executor_pb2.RunStatus

#: How often a follower of a run executing on another replica reads the store.
FOLLOW_POLL_SECONDS = 0.2
#: RetryInfo of a Run refused for capacity: about what a short run takes to free a slot.
RUN_CAPACITY_RETRY_SECONDS = 1.0
#: Bound of a run's catalog check when a copy is at hand: the gateway answers it in about
#: a millisecond, and a run is not held up by a gateway that does not (the copy is used).
CATALOG_CHECK_SECONDS = 2.0


@dataclass(frozen=True)
class _Catalog:
    """A tenant's tool catalog as the gateway gave it."""

    version: str
    tools: list[common_pb2.ToolSpec]
    #: When the gateway last confirmed it (monotonic seconds).
    checked: float


@dataclass(frozen=True)
class ActiveRun:
    """A run executing in this process, as a second Run with its id finds it."""

    task: asyncio.Task[None]
    events: RunEvents
    trace_id: str
    tenant_id: str
    #: Resumed here with no client of its own: followers leaving do not cancel it.
    detached: bool = False


class Runner:
    def __init__(
        self,
        *,
        planner: ports.Planner,
        gateway: ports.Gateway,
        budget: ports.Budget,
        ledger: ports.Ledger,
        store: RunStore,
        tracer: trace.Tracer,
        settings: ExecutorSettings,
    ) -> None:
        self._gateway = gateway
        self._budget = budget
        self._store = store
        self._tracer = tracer
        self._settings = settings
        self.sessions = Sessions(
            store,
            planner,
            context_tokens=settings.session_context_tokens,
            ttl_seconds=settings.session_ttl,
            max_turns=settings.session_max_turns,
        )
        self._execution = RunExecution(
            planner=planner,
            gateway=gateway,
            ledger=ledger,
            process_slots=asyncio.Semaphore(settings.max_parallel_process),
            gateway_retry_seconds=settings.gateway_retry_seconds,
            sessions=self.sessions,
        )
        self._active: dict[str, ActiveRun] = {}
        #: Runs being created or resumed here: not in ``_active`` yet, not claimable.
        self._starting: set[str] = set()
        self._tools: dict[str, _Catalog] = {}
        self._page_tokens = PageTokens(store.page_token_key)
        self._leases = LeaseKeeper(
            store,
            interval=settings.lease_seconds / 3,
            held=self._active.keys,
            lost=self._lose,
            cancel=self._cancel_here,
            resume=self._resume,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Resume this replica's unfinished runs; keep leases from now on."""
        await self._leases.start()

    async def drain(self, grace: float) -> None:
        """The server stops: runs get ``grace`` seconds to finish, the rest go to peers.

        A handed-over run is not marked CANCELLED: its lease is released so another
        replica resumes it at once, and its clients are told to follow it there.
        """
        tasks = [active.task for active in self._active.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self._leases.stop()
        left = [active for active in self._active.values() if not active.task.done()]
        for active in left:
            active.events.lose()
            active.task.cancel()
        if left:
            await asyncio.wait([active.task for active in left])
            await self._store.release([active.events.run_id for active in left])
            log.info("runs handed over", runs=len(left))

    # -- public API ---------------------------------------------------------------------

    async def run(
        self, request: executor_pb2.RunRequest
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        """Start a run and stream its events until ``finished``.

        A client-chosen ``run_id`` is idempotent: when that run already exists, the
        caller follows it (attached if it runs here, from the store if elsewhere,
        replayed if finished) instead of starting it twice, so a client can safely
        retry a dropped Run.
        """
        run_id = request.run_id or uuid.uuid4().hex
        if request.run_id and (existing := await self._existing(run_id)) is not None:
            async for event in existing:
                yield event
            return
        if run_id not in self._starting:  # else a concurrent Run creates it: we only attach
            self._admit()
        span = self._tracer.start_span(
            "trellis.run",
            attributes={
                "trellis.run_id": run_id,
                "trellis.tenant_id": context.tenant(),
                "gen_ai.operation.name": "invoke_agent",
                **_session_attribute(request.session_id),
            },
        )
        active, abandoned = None, False
        self._starting.add(run_id)
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False):
                try:
                    run, abandoned = await self._prepare(run_id, request, span)
                except BaseException as error:
                    span.record_exception(error)
                    span.set_status(trace.StatusCode.ERROR, str(error))
                    span.end()
                    if not (isinstance(error, AlreadyExists) and request.run_id):
                        raise
                else:
                    active = self._launch(run, span)
        finally:
            self._starting.discard(run_id)
        if active is not None and abandoned:
            # The caller went away while the run was being stored: it exists, so it ends
            # like any run its caller left (cancelled, or out of time at its deadline).
            await self._leave(active, None)
            raise asyncio.CancelledError
        if active is None:  # a concurrent Run with this id created it first: follow that one
            existing = await self._existing(run_id)
            if existing is None:  # pragma: no cover - created and then gone: cannot happen
                raise AlreadyExists(f"run {run_id} exists", reason="RUN_EXISTS")
            async for event in existing:
                yield event
            return
        async for event in self._stream(active, active.events.subscribe()):
            yield event

    async def resume(self, run_id: str) -> AsyncIterator[executor_pb2.RunResponse]:
        """ResumeRun: the run's events, continuing it here if no live replica owns it."""
        stored = await self._store.get(run_id)
        if stored is None or stored.tenant_id != context.tenant():
            raise _not_found(run_id)
        existing = await self._existing(run_id)
        if existing is None:  # pragma: no cover - stored runs are never deleted
            raise _not_found(run_id)
        async for event in existing:
            yield event

    async def get(self, run_id: str) -> executor_pb2.Run:
        run = await self._store.get(run_id)
        if run is None or run.tenant_id != context.tenant():
            raise _not_found(run_id)
        return run

    async def list_runs(
        self, request: executor_pb2.ListRunsRequest
    ) -> executor_pb2.ListRunsResponse:
        """A page of the caller's runs (``run_list``); another tenant's never appear."""
        return await list_page(self._store, self._page_tokens, context.tenant(), request)

    async def tools(self) -> list[common_pb2.ToolSpec]:
        """The catalog the caller's tenant sees: what a run started now plans with."""
        return await self._catalog()

    async def cancel(self, run_id: str) -> executor_pb2.RunStatus.ValueType:
        """Cancel a run here, or flag it for the replica that owns it and wait (up to a
        lease period) for that replica to end it; RUNNING if it has not yet."""
        run = await self.get(run_id)
        if run_id in self._active:
            await self._cancel_here(run_id)
            return RunStatus.RUN_STATUS_CANCELLED
        if run.status != RunStatus.RUN_STATUS_RUNNING:
            return run.status
        await self._store.request_cancel(run_id)
        deadline = time.monotonic() + self._settings.lease_seconds
        while run.status == RunStatus.RUN_STATUS_RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            run = await self.get(run_id)
        return run.status

    def _admit(self) -> None:
        """Refuse a new run at once when ``max_active_runs`` are executing or starting here.

        Overload is shed, not queued: the caller gets RESOURCE_EXHAUSTED (RUN_CAPACITY)
        with a RetryInfo right away instead of a run that crawls until its deadline.
        Attaching to, replaying and resuming existing runs is never refused.
        """
        busy = len(self._active.keys() | self._starting)
        limit = self._settings.max_active_runs
        if busy >= limit:
            raise ResourceExhausted(
                f"this executor is at its limit of {limit} active runs; retry later",
                reason="RUN_CAPACITY",
                metadata={"max_active_runs": str(limit)},
                retry_delay=RUN_CAPACITY_RETRY_SECONDS,
            )

    # -- following a run ----------------------------------------------------------------

    async def _existing(self, run_id: str) -> AsyncIterator[executor_pb2.RunResponse] | None:
        """Events of the run ``run_id`` if it exists (None if not): attached to it here,
        resumed here when no live replica holds its lease, else followed in the store."""
        active = self._active.get(run_id)
        if active is None:
            stored = await self._store.get(run_id)
            if stored is None:
                return None
            _check_same_tenant(run_id, stored.tenant_id)
            if (
                stored.status == RunStatus.RUN_STATUS_RUNNING
                and run_id not in self._active
                and run_id not in self._starting
                and await self._store.claim(limit=1, run_id=run_id, own=True)
            ):
                await self._resume(run_id)
            active = self._active.get(run_id)
            if active is None:
                return follow_stored(self._store, stored, poll_seconds=FOLLOW_POLL_SECONDS)
        _check_same_tenant(run_id, active.tenant_id)
        # subscribe now, before any await, so no event falls between check and stream
        return self._stream(active, active.events.subscribe())

    async def _stream(
        self, active: ActiveRun, queue: Queue
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        """``started``, the run's events so far and as they come, then how it ended."""
        try:
            yield executor_pb2.RunResponse(
                run_id=active.events.run_id,
                started=executor_pb2.RunStarted(trace_id=active.trace_id),
            )
            while (event := await queue.get()) is not None:
                yield event
            if active.events.lost:
                raise Unavailable(
                    f"run {active.events.run_id} continues on another executor;"
                    " ResumeRun follows it there",
                    reason="RUN_MOVED",
                    metadata={"run_id": active.events.run_id},
                )
            if active.events.rejection is not None:
                raise active.events.rejection
            await asyncio.wait([active.task])
            if not active.task.cancelled() and active.task.exception():
                raise active.task.exception()  # type: ignore[misc]
        finally:
            await self._leave(active, queue)

    async def _leave(self, active: ActiveRun, queue: Queue | None) -> None:
        """A follower is gone; when it was the last one, cancel everything under the run.

        Not when the follower's own deadline is what ended its call: the run's deadline
        is earlier (``Limits.of``), so the run is ending FAILED DEADLINE_EXCEEDED by itself
        and must not turn CANCELLED by racing it."""
        if queue is not None:
            active.events.unsubscribe(queue)
        if active.events.subscribers == 0 and not active.detached and not active.task.done():
            left = context.remaining()
            if left is None or left > 0:
                active.task.cancel()
            await asyncio.wait([active.task])

    # -- starting, resuming and losing runs ---------------------------------------------

    def _launch(self, run: RunContext, span: trace.Span, *, detached: bool = False) -> ActiveRun:
        task = asyncio.create_task(self._execution.execute(run, span), name=f"run:{run.run_id}")
        trace_id = trace_id_of(span)  # empty when tracing is off
        active = ActiveRun(task, run.events, trace_id, context.tenant(), detached)
        self._active[run.run_id] = active

        def gone(_: object) -> None:
            if self._active.get(run.run_id) is active:
                del self._active[run.run_id]

        task.add_done_callback(gone)
        return active

    async def _resume(self, run_id: str) -> None:
        """Continue a run this replica has just claimed, in the background."""
        if run_id in self._active or run_id in self._starting:
            return  # already ours and running (the claim only renewed its lease)
        self._starting.add(run_id)
        try:
            stored = await self._store.get(run_id)
            saved = await self._store.load(run_id)
            if stored is None or saved is None or stored.status != RunStatus.RUN_STATUS_RUNNING:
                return
            with context.request_scope(tenant_id=stored.tenant_id):
                span = self._tracer.start_span(
                    "trellis.run",
                    context=_run_trace(stored.trace_id, saved.span_id),
                    attributes={
                        "trellis.run_id": run_id,
                        "trellis.tenant_id": stored.tenant_id,
                        "trellis.resumes": saved.resumes,
                        "gen_ai.operation.name": "invoke_agent",
                        **_session_attribute(saved.request.session_id),
                    },
                )
                # the timeout decided at the start is in the stored request's options
                limits = Limits.of(saved.request.options, self._settings)
                elapsed = max(0.0, time.time() - timestamp_seconds(stored.created_at))
                done = {outcome.node_id for outcome in stored.outcomes}
                events = RunEvents(
                    run_id,
                    self._store,
                    history=StoredEvents().new(stored),
                    retried=[c.node_id for c in stored.plan if c.node_id not in done],
                )
                run = RunContext(
                    run_id,
                    saved.request,
                    limits,
                    await self._catalog(),
                    events,
                    time.monotonic() - elapsed,
                    saved.progress,
                    stored,
                    saved.resumes,
                )
                self._launch(run, span, detached=True)
        finally:
            self._starting.discard(run_id)

    async def _cancel_here(self, run_id: str) -> None:
        active = self._active.get(run_id)
        if active is not None and not active.task.done():
            active.task.cancel()
            await asyncio.wait([active.task])

    def _lose(self, run_id: str) -> None:
        """Another replica took the run over: stop it here without writing anything."""
        active = self._active.get(run_id)
        if active is None or active.events.ended:
            return
        log.warning("run taken over by another executor", run_id=run_id)
        active.events.lose()
        active.task.cancel()

    # -- one run --------------------------------------------------------------------------

    async def _prepare(
        self, run_id: str, request: executor_pb2.RunRequest, span: trace.Span
    ) -> tuple[RunContext, bool]:
        """Everything that may reject the run before any event: plan, budget, store.

        Also whether the caller was cancelled while the run was being stored: a run
        whose row is written is launched all the same, so that it gets its ending.
        """
        started = time.monotonic()  # the deadline counts from here, as the caller's does
        limits = Limits.of(request.options, self._settings, context.remaining())
        budget = asyncio.ensure_future(  # asked meanwhile: two independent round trips
            require_budget(
                lambda: self._budget.check_budget(0),
                BudgetPolicy.of(self._settings),
                refused="no run started",
            )
        )
        try:
            tools = await self._catalog()
            if request.plan:
                _check_explicit_plan(request.plan, tools, limits.max_nodes)
        except BaseException:
            budget.cancel()
            await asyncio.gather(budget, return_exceptions=True)  # its verdict is moot
            raise
        await budget
        write = asyncio.ensure_future(
            self._store.create(
                run_id,
                context.tenant(),
                _with_timeout(request, limits.timeout),
                trace_id_of(span),
                span_id_of(span),
                session_id=request.session_id,
                rules=self.sessions.rules if request.session_id else None,
            )
        )
        abandoned = False
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await write  # the row is being written (or the write fails: nothing to end)
            abandoned = True
        events = RunEvents(run_id, self._store)
        return RunContext(run_id, request, limits, tools, events, started), abandoned

    async def _catalog(self) -> list[common_pb2.ToolSpec]:
        """The tenant's tools, kept per tenant with the gateway's catalog version.

        Used as they are for ``tools_cache_seconds`` while no gateway answer carried
        another version; otherwise checked with a ListTools that answers "unchanged"
        (no tools) when the version still holds. So a tool the gateway just added (a
        reload, an MCP server's list_changed) is in the next run's catalog. A check the
        gateway does not answer within ``CATALOG_CHECK_SECONDS`` (down, overloaded) uses
        the copy at hand: the run goes on, and its tool calls meet the gateway's state.
        """
        tenant, now = context.tenant(), time.monotonic()
        cached = self._tools.get(tenant)
        if (
            cached is not None
            and now - cached.checked < self._settings.tools_cache_seconds
            and cached.version == self._gateway.catalog_version
        ):
            return cached.tools
        if cached is None:
            response = await self._gateway.catalog()
        else:
            try:
                async with asyncio.timeout(CATALOG_CHECK_SECONDS):
                    response = await self._gateway.catalog(cached.version)
            except (TrellisError, TimeoutError) as error:
                log.warning(
                    "tool catalog not checked: the gateway did not answer; using the last one",
                    error=str(error) or type(error).__name__,
                )
                return cached.tools
        if response.unchanged and cached is not None:
            cached = replace(cached, checked=now)
        else:
            cached = _Catalog(response.catalog_version, list(response.tools), now)
        self._tools[tenant] = cached
        return cached.tools


def _with_timeout(request: executor_pb2.RunRequest, timeout: float) -> executor_pb2.RunRequest:
    """The request as stored: with the timeout decided at its start, so that a replica
    resuming the run holds it to the same deadline (the caller's included)."""
    stored = executor_pb2.RunRequest()
    stored.CopyFrom(request)
    stored.options.timeout.CopyFrom(duration(timeout))
    return stored


def _session_attribute(session_id: str) -> dict[str, str]:
    """The run span's ``session.id`` (OpenTelemetry's semantic convention), when a turn."""
    return {"session.id": session_id} if session_id else {}


def _not_found(run_id: str) -> NotFound:
    return NotFound(f"no run {run_id}", reason="RUN_NOT_FOUND", metadata={"run_id": run_id})


def _run_trace(trace_id: str, span_id: str) -> Context | None:
    """Context whose parent is the run's original root span: a resumed run stays in
    the run's one trace (None, a new trace, when the store has no span id)."""
    if not trace_id or not span_id:
        return None
    parent = SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _check_same_tenant(run_id: str, tenant_id: str) -> None:
    """Another tenant's run id is taken, but its run is not theirs to follow."""
    if tenant_id != context.tenant():
        raise AlreadyExists(f"run {run_id} exists", reason="RUN_EXISTS")


def _check_explicit_plan(
    plan: Sequence[common_pb2.ToolCall], tools: Sequence[common_pb2.ToolSpec], max_nodes: int
) -> None:
    """Reject a bad explicit plan before anything runs."""
    checker = NodeChecker([t.name for t in tools], max_nodes)
    for index, call in order_explicit_plan(plan):
        checker.check(call, f"plan[{index}]")
