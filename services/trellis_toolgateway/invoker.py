"""The gateway's core: one tool call in, one ``NodeOutcome`` out. No gRPC here.

For each call: find the tool (unknown -> ``NotFound``), check the arguments against
its input schema (-> ``InvalidArgument`` with one field violation per problem), then
take one of three paths:

- side-effecting tool with an idempotency key: run at most once per (tenant, tool,
  key); a repeat gets the first outcome back, waiting for it if the first call still
  runs, or FAILED ``IDEMPOTENCY_UNKNOWN`` if the first call's owner stopped without an
  outcome (a gateway killed mid-call: the effect may have happened). The store is
  in-process or shared in Redis (``trellis_toolgateway.redis_idempotency``); with the store
  unreachable the call is refused ``UNAVAILABLE``/``IDEMPOTENCY_STORE_UNAVAILABLE``;
- cacheable tool: identical concurrent calls share one flight (``policy.singleflight``)
  which reads the result cache, runs the tool on a miss and stores a success; a hit in
  the tool's ``refresh_ahead`` window also starts one background refresh of the entry
  (``refresh_ahead``);
- anything else: run it.

A side-effecting call that reached its backend drops the cached results its tool's
``invalidates`` rules name (``invalidation``) before its outcome is returned, so a node
depending on it reads fresh values; ``invalidate`` does the same for an operator.

"Run it" is the execution policy (``execution``: breaker, concurrency limit, attempts
with retries, output contract), through ``batching`` for a tool that declares ``batch``
(so cache, single-flight and idempotency apply per call, before batching); the input
contract is ``contracts``; the cache is used fail-open through ``result_cache``, keyed
by what decides a result (``Tool.cache_key_args``: a model tool's rendered prompt and model).

Outcome fields this module decides:

- ``attempts``: backend attempts this call made; 0 when it ran nothing (cache hit,
  shared single-flight result, circuit open, idempotent replay keeps the first's).
- ``cost_nano_usd``: ``spec.cost_nano_usd`` per attempt that reached the backend (a
  paid API bills a retry too); 0 when nothing ran.
- ``cache_hit``: served without running: from the cache, or a single-flight follower
  sharing a successful result (both cost nothing, which is what the run's
  ``cache_hits`` tells the user).
- ``cache_refreshing``: a hit on an entry in its refresh-ahead window.
- ``usage``: model tokens a model tool's attempts spent (as ``cost_nano_usd``: the
  leader's, never a follower's or a cache hit's).

Every execution that reached the backend (``attempts > 0``) is reported once to the
``usage`` sink, with the run and node it ran for (the single-flight leader's, the
first idempotent caller's, also when that caller left), as the call's outcome is final;
nothing else is (cache hits, shared results and replays ran nothing). A background
refresh is reported outside any run (the tenant pays; the run that hit paid nothing).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from google.protobuf import timestamp_pb2
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, timestamp
from trellis.runtime.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    quote,
)
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import (
    CACHE_INVALIDATIONS,
    CACHE_REFRESHES,
    CACHE_STALE_SERVED,
    TOOL_CALLS,
    TOOL_DURATION,
)
from trellis_toolgateway.batching import Batcher
from trellis_toolgateway.cache_keys import (
    args_fingerprint,
    cache_key,
    idempotency_scope,
)
from trellis_toolgateway.contracts import validate_args
from trellis_toolgateway.execution import PolicyRunner, failed_outcome
from trellis_toolgateway.invalidation import PendingWrites, Target, Write, changed_tools
from trellis_toolgateway.policy.breaker import (
    BreakerConfig,
    CircuitBreaker,
)
from trellis_toolgateway.policy.clock import Clock, Sleep
from trellis_toolgateway.policy.idempotency import (
    DEFAULT_TTL,
    IdempotencyStore,
    KeyConflict,
    MemoryIdempotencyStore,
    OutcomeUnknown,
    StoreUnavailable,
)
from trellis_toolgateway.policy.retry import Backoff
from trellis_toolgateway.policy.singleflight import SingleFlight
from trellis_toolgateway.refresh_ahead import RefreshAhead, refresh_due
from trellis_toolgateway.registry import Entry, ToolLookup, ToolRegistry
from trellis_toolgateway.result_cache import FailOpenCache, ResultCache
from trellis_toolgateway.tools.base import CallInfo, Json

log = get_logger(__name__)

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
CacheMode = common_pb2.CacheMode
NodeOutcome = common_pb2.NodeOutcome

_READS = (CacheMode.CACHE_MODE_UNSPECIFIED, CacheMode.CACHE_MODE_USE)
_WRITES = (*_READS, CacheMode.CACHE_MODE_REFRESH)

#: Span attributes added by the policy (besides the GenAI ones).
ATTR_ATTEMPTS = "trellis.tool.attempts"
ATTR_SHARED = "trellis.single_flight.shared"
ATTR_REPLAY = "trellis.idempotent_replay"
#: A hit on an entry being refreshed ahead; on a background refresh's own span, "background".
ATTR_REFRESHING = "trellis.cache.refreshing"
ATTR_REFRESH = "trellis.cache.refresh"


class UsageSink(Protocol):
    """Where executions are reported for costing (``trellis_toolgateway.tool_usage.ToolUsage``);
    it must not block the call."""

    def executed(
        self,
        *,
        tool: str,
        run_id: str,
        node_id: str,
        outcome: NodeOutcome,
        model_tool: bool = False,
    ) -> None: ...


@dataclass(frozen=True)
class Call:
    """One tool call as the core sees it (``ToolCall`` without the wire types)."""

    tool: str
    args: dict[str, Json] = field(default_factory=dict)
    node_id: str = ""

    @classmethod
    def from_proto(cls, call: common_pb2.ToolCall) -> Call:
        return cls(tool=call.tool, args=from_struct(call.args), node_id=call.node_id)


class _Flown(NamedTuple):
    """What one cache flight found or ran, and whether to store the outcome."""

    outcome: NodeOutcome
    cache_use: str
    write: bool
    #: A hit of a refresh-ahead tool: the entry's remaining TTL, and the read's ticket.
    ttl_left: float | None = None
    ticket: int = 0


def _stamp(outcome: NodeOutcome, node_id: str, started_at: timestamp_pb2.Timestamp) -> None:
    outcome.node_id = node_id
    outcome.started_at.CopyFrom(started_at)
    outcome.finished_at.CopyFrom(timestamp())


def _store_unavailable(tool: str, error: StoreUnavailable) -> Unavailable:
    log.warning("side-effecting call refused: idempotency store unreachable", tool=tool)
    return Unavailable(
        f"{tool!r} has side effects and the idempotency store is unreachable, so it cannot "
        f"be run at most once; try again later ({error})",
        reason="IDEMPOTENCY_STORE_UNAVAILABLE",
        metadata={"tool": tool},
    )


def _log_orphan_failure(run: asyncio.Task[NodeOutcome]) -> None:
    """Done callback of a run whose caller left: nobody else will see its error."""
    if not run.cancelled() and (error := run.exception()) is not None:
        log.error("idempotent tool run failed after its caller left", exc_info=error)


class Invoker:
    """Runs tool calls from ``registry`` with ``cache`` (None: no caching) and ``tracer``.

    Policy knobs are constructor parameters so tests (and later settings) set them:
    ``breaker`` thresholds and cool-down, retry ``backoff``, ``queue_per_slot`` (the
    waiting line of a tool is this many times its ``max_concurrency``), the
    ``idempotency`` store and ``idempotency_ttl``. ``clock``, ``sleep`` and ``rng``
    make time and jitter deterministic in tests. ``usage`` (None: not recorded) is told
    of every execution that reached a backend.
    """

    def __init__(
        self,
        registry: ToolLookup,
        cache: ResultCache | None,
        tracer: trace.Tracer,
        *,
        breaker: BreakerConfig | None = None,
        backoff: Backoff | None = None,
        queue_per_slot: int = 4,
        idempotency: IdempotencyStore | None = None,
        idempotency_ttl: float = DEFAULT_TTL,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        usage: UsageSink | None = None,
    ) -> None:
        self._registry = registry
        self._usage = usage
        self._cache = FailOpenCache(cache) if cache is not None else None
        self._tracer = tracer
        self._policy = PolicyRunner(
            breaker=breaker,
            backoff=backoff,
            queue_per_slot=queue_per_slot,
            clock=clock,
            sleep=sleep,
            rng=rng,
        )
        self._batcher = Batcher(self._policy, tracer)
        self._idempotency = idempotency or MemoryIdempotencyStore(clock=clock)
        self._idempotency_ttl = idempotency_ttl
        self._flights: SingleFlight[_Flown] = SingleFlight()
        self._pending = PendingWrites()
        self._refresh = RefreshAhead()
        # Idempotent runs outliving their cancelled caller, and invalidations after a
        # side effect; held so they are not GC'd, given the grace period on close.
        self._background: set[asyncio.Task[Any]] = set()
        # Background refreshes (refresh_ahead): cancelled on close, nothing depends on them.
        self._refreshes: set[asyncio.Task[None]] = set()

    def breaker(self, tool: str) -> CircuitBreaker:
        """The breaker of ``tool`` (for status pages, metrics and tests)."""
        return self._policy.breakers.get(tool)

    async def invoke(
        self,
        call: Call | common_pb2.ToolCall,
        *,
        run_id: str = "",
        idempotency_key: str = "",
        cache_mode: common_pb2.CacheMode.ValueType = CacheMode.CACHE_MODE_UNSPECIFIED,
    ) -> NodeOutcome:
        """The outcome of ``call``; contract violations raise ``NotFound``/``InvalidArgument``,
        a full queue raises ``ResourceExhausted(TOOL_BUSY)``.

        ``idempotency_key`` deduplicates side-effecting tools (empty: no deduplication);
        other tools ignore it, their repeats are what the cache is for.
        """
        if isinstance(call, common_pb2.ToolCall):
            call = Call.from_proto(call)
        entry = self._registry.get(call.tool)
        if entry is None:
            raise NotFound(
                f"unknown tool {quote(call.tool)}",
                reason="UNKNOWN_TOOL",
                metadata={"tool": call.tool},
            )
        spec, tenant = entry.tool.spec, context.tenant()
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": spec.name,
            "gen_ai.tool.call.id": call.node_id,
            "trellis.run_id": run_id,
            "trellis.node_id": call.node_id,
            "trellis.tenant_id": tenant,
        }
        with self._tracer.start_as_current_span(
            f"execute_tool {spec.name}", kind=SpanKind.INTERNAL, attributes=attributes
        ) as span:
            validate_args(entry, call.args)
            clock, started_at = time.perf_counter(), timestamp()
            if spec.side_effects and idempotency_key:
                outcome = await self._run_once(
                    entry, call, run_id, idempotency_key, started_at, span
                )
                cache_use = "bypass"
            else:
                ttl = (
                    min(entry.tool.cache_ttl_for(call.args), spec.cache_ttl)
                    if spec.cacheable
                    else 0
                )
                if ttl > 0:
                    outcome, cache_use = await self._cached(
                        entry, call, run_id, ttl, cache_mode, span
                    )
                else:
                    outcome = await self._execute(entry, call, run_id, span)
                    cache_use = "bypass"
                _stamp(outcome, call.node_id, started_at)
            self._observe(spec.name, outcome, cache_use, time.perf_counter() - clock, span)
            return outcome

    async def _execute(
        self, entry: Entry, call: Call, run_id: str, span: trace.Span, idempotency_key: str = ""
    ) -> NodeOutcome:
        """Run the tool under its policy (with the calls it is batched with, if it
        batches); report the execution if it reached the backend, and drop the cached
        results it made stale (a side effect may have happened even when the call then
        failed)."""
        info = CallInfo(run_id=run_id, node_id=call.node_id, idempotency_key=idempotency_key)
        if entry.tool.spec.batched:
            outcome = await self._batcher.run(entry, call.args, info, span)
        else:
            outcome = await self._policy.run(entry, call.args, span, info)
        if self._usage is not None and outcome.attempts > 0:
            self._usage.executed(
                tool=entry.tool.spec.name,
                run_id=run_id,
                node_id=call.node_id,
                outcome=outcome,
                model_tool=entry.tool.spec.calls_model,
            )
        if outcome.attempts > 0 and entry.tool.spec.side_effects:
            await self._invalidate_after(entry, call, span)
        return outcome

    # -- invalidation ------------------------------------------------------------------

    async def _invalidate_after(self, entry: Entry, call: Call, span: trace.Span) -> None:
        """Drop what the side-effecting ``call`` made stale before it is answered.

        The removal runs as a task of its own, shielded: a caller that leaves (its
        deadline, a reset stream) does not stop it. A cache that fails it costs an error
        log, ``trellis_cache_invalidations_total{outcome="error"}`` and a span event,
        not the call: its effect happened.
        """
        index = self._registry.invalidation
        if self._cache is None or not index.invalidates(entry.tool.spec.name):
            return
        targets = index.after_call(entry.tool, context.tenant(), call.args)
        drop = asyncio.ensure_future(self._drop(targets, "side_effect", span, strict=False))
        self._background.add(drop)
        drop.add_done_callback(self._background.discard)
        await asyncio.shield(drop)

    async def _drop(
        self, targets: Sequence[Target], cause: str, span: trace.Span, *, strict: bool
    ) -> int:
        """Remove ``targets``' entries; how many went. ``strict``: a cache failure raises
        (an operator's request), else it is logged and counted."""
        groups = [group for target in targets for group in target.groups]
        if self._cache is None or not groups:
            return 0
        self._pending.invalidated(groups)  # results being computed now are not stored
        try:
            with context.request_scope(detached=True):  # the deadline of the cache client
                removed = await self._cache.invalidate(groups)
        except Exception as error:
            for target in targets:
                CACHE_INVALIDATIONS.labels(tool=target.tool, cause=cause, outcome="error").inc()
            if strict:
                raise
            log.error(
                "cached results not invalidated; they may be served until their TTL ends",
                tools=[t.tool for t in targets],
                cause=cause,
            )
            FailOpenCache.cache_failed("invalidate", error, span)
            return 0
        for target in targets:
            CACHE_INVALIDATIONS.labels(tool=target.tool, cause=cause, outcome="ok").inc()
        if span.is_recording():
            span.add_event(
                "trellis.cache.invalidated",
                {
                    "trellis.cache.cause": cause,
                    "trellis.cache.tools": [t.tool for t in targets],
                    "trellis.cache.entries": removed,
                },
            )
        return removed

    async def invalidate(
        self, tool: str, tenant: str | None, args: Mapping[str, Json] | None = None
    ) -> int:
        """Drop ``tool``'s cached results for ``tenant`` (None: every tenant's), only
        those for ``args`` values if given; how many went. ``NotFound`` for an unknown
        tool; a cache failure raises (the caller asked for exactly this)."""
        entry = self._registry.get(tool)
        if entry is None:
            raise NotFound(
                f"unknown tool {quote(tool)}", reason="UNKNOWN_TOOL", metadata={"tool": tool}
            )
        target = self._registry.invalidation.explicit(entry.tool, tenant, args)
        with self._tracer.start_as_current_span(
            f"invalidate_cache {tool}",
            kind=SpanKind.INTERNAL,
            attributes={"gen_ai.tool.name": tool, "trellis.tenant_id": tenant or "*"},
        ) as span:
            return await self._drop([target], "explicit", span, strict=True)

    async def reloaded(self, old: ToolRegistry, new: ToolRegistry) -> None:
        """After a reload: drop the results of tools removed or changed (fail-open)."""
        targets = changed_tools(old.tools(), new.tools(), old.invalidation, new.invalidation)
        if targets:
            log.info(
                "tools changed on reload; their cached results dropped",
                tools=[t.tool for t in targets],
            )
            await self._drop(targets, "reload", trace.INVALID_SPAN, strict=False)

    async def settled(self) -> None:
        """Wait for the cache flights and background refreshes under way, their writes
        included (warming waits so that its results are stored when it returns)."""
        while self._refreshes:
            await asyncio.gather(*list(self._refreshes), return_exceptions=True)
        await self._flights.drain()

    # -- the three paths ---------------------------------------------------------------

    async def _run_once(
        self,
        entry: Entry,
        call: Call,
        run_id: str,
        idempotency_key: str,
        started_at: timestamp_pb2.Timestamp,
        span: trace.Span,
    ) -> NodeOutcome:
        """Side-effecting tool: the first outcome for this key, running the tool at most once.

        Only an outcome of a call that reached the backend is kept (even a FAILED one:
        the side effect may have happened, so at-most-once wins over a retry). When the
        first call ran nothing (circuit open, busy, bad arguments) the key is released
        and the next call with it runs. When it stopped without an outcome (cancelled
        at shutdown, or its process died and its lease ran out) the key is abandoned:
        this and every later call with it get FAILED ``IDEMPOTENCY_UNKNOWN``, not retryable.
        The store unreachable: ``Unavailable(IDEMPOTENCY_STORE_UNAVAILABLE)``, nothing ran.

        Once the key is claimed, the run is a task of its own, shielded from the caller:
        a caller that goes away (the executor killed, its stream reset) gets
        ``CancelledError`` at once, but the run - possibly mid side effect - goes on,
        bounded by the tool's timeout and the request's deadline (the task inherits the
        context), and its outcome is stored under the key as if the caller had waited.
        The executor's retry with the key then gets that outcome instead of running the
        tool a second time.
        """
        spec = entry.tool.spec
        key = idempotency_scope(context.tenant(), spec.name, idempotency_key)
        fingerprint = args_fingerprint(call.args)
        while True:
            try:
                if await self._idempotency.claim(key, fingerprint, self._idempotency_ttl):
                    break
            except StoreUnavailable as error:
                raise _store_unavailable(spec.name, error) from None
            except KeyConflict:
                raise InvalidArgument(
                    f"idempotency key {quote(idempotency_key)} was already used for a call of "
                    f"{spec.name!r} with other arguments",
                    reason="IDEMPOTENCY_KEY_REUSED",
                    violations=[
                        FieldViolation("idempotency_key", "already used with other arguments")
                    ],
                    metadata={"tool": spec.name},
                ) from None
            try:
                async with asyncio.timeout(context.remaining()):
                    stored = await self._idempotency.wait(key)
            except TimeoutError:
                outcome = failed_outcome(
                    "IDEMPOTENCY_PENDING",
                    f"an earlier call of {spec.name!r} with this idempotency key is still running",
                    retryable=True,
                )
                _stamp(outcome, call.node_id, started_at)
                return outcome
            except OutcomeUnknown:
                outcome = failed_outcome(
                    "IDEMPOTENCY_UNKNOWN",
                    f"an earlier call of {spec.name!r} with this idempotency key stopped "
                    "without an outcome (its gateway went away mid-call); it may have taken "
                    "effect, so it is not run again",
                    details={"tool": spec.name},
                )
                _stamp(outcome, call.node_id, started_at)
                span.set_attribute(ATTR_REPLAY, True)
                return outcome
            except StoreUnavailable as error:
                raise _store_unavailable(spec.name, error) from None
            if stored is not None:
                outcome = NodeOutcome.FromString(stored)
                outcome.node_id = call.node_id
                span.set_attribute(ATTR_REPLAY, True)
                return outcome
            # The first call ran nothing and let go of the key: try to own it.
        run = asyncio.create_task(
            self._run_claimed(entry, call, run_id, key, idempotency_key, started_at, span)
        )
        self._background.add(run)
        run.add_done_callback(self._background.discard)
        try:
            return await asyncio.shield(run)
        except asyncio.CancelledError:
            run.add_done_callback(_log_orphan_failure)  # the caller left, the run goes on
            raise

    async def _run_claimed(
        self,
        entry: Entry,
        call: Call,
        run_id: str,
        key: str,
        idempotency_key: str,
        started_at: timestamp_pb2.Timestamp,
        span: trace.Span,
    ) -> NodeOutcome:
        """Run the tool for the claimed ``key``; complete the key with the outcome if it
        reached the backend, release it if nothing ran (also when the call raised: a
        contract violation or a full queue), abandon it when cancelled (the gateway
        stopping mid-call: the effect may be under way).

        The caller gets the outcome even when the store cannot take it; the key then
        reads as unknown once its lease ends, so a retry still does not run it again.
        """
        try:
            outcome = await self._execute(entry, call, run_id, span, idempotency_key)
        except asyncio.CancelledError:
            await self._let_go(self._idempotency.abandon, key)
            raise
        except BaseException:
            await self._let_go(self._idempotency.release, key)
            raise
        _stamp(outcome, call.node_id, started_at)
        if outcome.attempts > 0:
            await self._let_go(self._idempotency.complete, key, outcome.SerializeToString())
        else:
            await self._let_go(self._idempotency.release, key)
        return outcome

    @staticmethod
    async def _let_go(operation: Callable[..., Awaitable[None]], key: str, *args: bytes) -> None:
        """End a claim; a store failure is logged, not raised: the caller still gets its
        outcome, and the key reads as unknown once its lease runs out."""
        try:
            await operation(key, *args)
        except StoreUnavailable as error:
            log.error("idempotency store failed to end a claim", key=key, error=str(error))

    async def aclose(self, grace: float = 0.0) -> None:
        """Give idempotent runs whose callers left (and invalidations after a side
        effect) ``grace`` seconds to finish, then cancel the rest (their keys are
        abandoned: unknown, never run again). Background refreshes and the batches still
        gathering are cancelled."""
        for refresh in list(self._refreshes):
            refresh.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)
        runs = list(self._background)
        if runs:
            _, pending = await asyncio.wait(runs, timeout=grace) if grace > 0 else ((), set(runs))
            for run in pending:
                run.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._batcher.aclose()  # the batches still gathering or under way

    async def _cached(
        self,
        entry: Entry,
        call: Call,
        run_id: str,
        ttl: float,
        cache_mode: common_pb2.CacheMode.ValueType,
        span: trace.Span,
    ) -> tuple[NodeOutcome, str]:
        """Cacheable tool: one flight per (cache key, mode) at a time, shared by all callers.

        Followers get a copy of the flight's outcome with nothing charged (attempts 0,
        cost 0); a shared success counts as a cache hit, both on the outcome and in
        ``trellis_tool_calls_total{cache="hit"}``. A hit in the tool's refresh-ahead
        window is marked ``cache_refreshing`` and may start the entry's refresh.
        """
        spec, tenant = entry.tool.spec, context.tenant()
        key = cache_key(
            tenant,
            spec.name,
            spec.version,
            entry.tool.cache_key_args(call.args),
            shared=spec.shared_cache,
        )
        mode = CacheMode.CACHE_MODE_USE if cache_mode in _READS else cache_mode
        writes: list[Write] = []  # the leader's, begun before it reads the cache

        async def flight() -> _Flown:
            writes.append(self._pending.begin(self._tags_of(entry, tenant, call)))
            try:
                return await self._lookup_or_run(entry, call, run_id, key, mode, span)
            except BaseException:
                self._pending.end(writes[0])
                raise

        async def fill(flown: _Flown) -> None:
            try:
                write = writes[0]
                if flown.write and not write.stale:
                    await self._cache.store(key, flown.outcome.output, ttl, write.tags, span)
            finally:
                self._pending.end(writes[0])

        flown, shared = await self._flights.do((key, mode), flight, then=fill)
        outcome = NodeOutcome()
        outcome.CopyFrom(flown.outcome)  # each caller stamps its own copy
        cache_use = flown.cache_use
        if shared:
            span.set_attribute(ATTR_SHARED, True)
            outcome.attempts = 0
            outcome.cost_nano_usd = 0
            outcome.ClearField("usage")
            outcome.cache_hit = outcome.status == SUCCEEDED
            cache_use = "hit" if outcome.cache_hit else "miss"
        if flown.ttl_left is not None and refresh_due(spec.refresh_ahead, ttl, flown.ttl_left):
            outcome.cache_refreshing = True
            CACHE_STALE_SERVED.labels(tool=spec.name).inc()
            if self._refresh.claim(key, flown.ticket):
                expires_at = time.monotonic() + flown.ttl_left
                self._start_refresh(entry, call, key, ttl, expires_at)
        return outcome, cache_use

    def _tags_of(self, entry: Entry, tenant: str, call: Call) -> Callable[[], list[str]]:
        """The tags of ``call``'s cache entry, worked out (once) when first asked for."""
        index = self._registry.invalidation
        return functools.cache(lambda: index.tags(entry.tool, tenant, call.args))

    async def _lookup_or_run(
        self,
        entry: Entry,
        call: Call,
        run_id: str,
        key: str,
        mode: common_pb2.CacheMode.ValueType,
        span: trace.Span,
    ) -> _Flown:
        """The outcome, how the cache was used, and whether to write the outcome to it.

        The write is left to the flight's ``then``: callers are answered first, and
        the flight lingers until the entry is written (see ``policy.singleflight``).
        """
        cache_use, cache_ok = "bypass", True
        if self._cache is not None and mode in _READS:
            cache_use = "miss"
            if entry.tool.spec.refresh_ahead > 0:
                ticket = self._refresh.ticket()
                cached, ttl_left, cache_ok = await self._cache.lookup_entry(key, span)
                if cached is not None:
                    return _Flown(cached, "hit", False, ttl_left, ticket)
            else:
                cached, cache_ok = await self._cache.lookup(key, span)
                if cached is not None:
                    return _Flown(cached, "hit", False)
        outcome = await self._execute(entry, call, run_id, span)
        # After a failed read, a write would most likely fail too and cost a second
        # cache timeout; skip it.
        write = self._cache is not None and cache_ok and mode in _WRITES
        return _Flown(outcome, cache_use, write and outcome.status == SUCCEEDED)

    # -- refresh-ahead -----------------------------------------------------------------

    def _start_refresh(
        self, entry: Entry, call: Call, key: str, ttl: float, expires_at: float
    ) -> None:
        """Refresh ``key`` in the background (its claim is taken: see ``refresh_ahead``)."""
        task = asyncio.create_task(
            self._refresh_entry(entry, call, key, ttl, expires_at),
            name=f"refresh-ahead {entry.tool.spec.name}",
        )
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _refresh_entry(
        self, entry: Entry, call: Call, key: str, ttl: float, expires_at: float
    ) -> None:
        """Run the tool again and store its result, as a flight of (key, REFRESH), so a
        caller refreshing the same key at the same time shares it. Its own deadline (the
        tool's timeout), its own span (a child of the hit's), outside any run."""
        spec = entry.tool.spec
        refreshed = False
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": spec.name,
            "trellis.tenant_id": context.tenant(),
            ATTR_REFRESH: "background",
        }
        try:
            with (
                context.request_scope(detached=True),
                self._tracer.start_as_current_span(
                    f"execute_tool {spec.name}", kind=SpanKind.INTERNAL, attributes=attributes
                ) as span,
            ):

                async def flight() -> _Flown:
                    write = self._pending.begin(self._tags_of(entry, context.tenant(), call))
                    try:
                        outcome = await self._execute(entry, Call(spec.name, call.args), "", span)
                        if outcome.status == SUCCEEDED and not write.stale and self._cache:
                            await self._cache.store(key, outcome.output, ttl, write.tags, span)
                    finally:
                        self._pending.end(write)
                    return _Flown(outcome, "refresh", False)

                flown, _ = await self._flights.do((key, CacheMode.CACHE_MODE_REFRESH), flight)
                refreshed = flown.outcome.status == SUCCEEDED
                if not refreshed:
                    span.set_attribute("error.type", flown.outcome.error.code)
                    span.set_status(Status(StatusCode.ERROR, flown.outcome.error.message))
        except Exception as error:  # a full queue, a bug: the old entry just expires
            log.warning("background refresh failed", tool=spec.name, error=str(error))
        finally:
            if refreshed:
                self._refresh.stored(key)
            else:
                self._refresh.failed(key, expires_at=expires_at)
            outcome_label = "refreshed" if refreshed else "failed"
            CACHE_REFRESHES.labels(tool=spec.name, outcome=outcome_label).inc()

    @staticmethod
    def _observe(
        tool: str,
        outcome: NodeOutcome,
        cache_use: str,
        seconds: float,
        span: trace.Span,
    ) -> None:
        succeeded = outcome.status == SUCCEEDED
        TOOL_CALLS.labels(
            tool=tool, outcome="succeeded" if succeeded else "failed", cache=cache_use
        ).inc()
        TOOL_DURATION.labels(tool=tool).observe(seconds)
        span.set_attribute("trellis.cache_hit", outcome.cache_hit)
        if outcome.cache_refreshing:
            span.set_attribute(ATTR_REFRESHING, True)
        span.set_attribute(ATTR_ATTEMPTS, outcome.attempts)
        if not succeeded:
            span.set_attribute("error.type", outcome.error.code)
            span.set_status(Status(StatusCode.ERROR, outcome.error.message))
