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
  which reads the result cache, runs the tool on a miss and stores a success;
- anything else: run it.

"Run it" is the execution policy (``execution``: breaker, concurrency limit, attempts
with retries, output contract), through ``batching`` for a tool that declares ``batch``
(so cache, single-flight and idempotency apply per call, before batching); the input
contract is ``contracts``; the cache is used fail-open through ``result_cache``, keyed
by what decides a result (``Tool.cache_args``: a model tool's rendered prompt and model).

Outcome fields this module decides:

- ``attempts``: backend attempts this call made; 0 when it ran nothing (cache hit,
  shared single-flight result, circuit open, idempotent replay keeps the first's).
- ``cost_nano_usd``: ``spec.cost_nano_usd`` per attempt that reached the backend (a
  paid API bills a retry too); 0 when nothing ran.
- ``cache_hit``: served without running: from the cache, or a single-flight follower
  sharing a successful result (both cost nothing, which is what the run's
  ``cache_hits`` tells the user).
- ``usage``: model tokens a model tool's attempts spent (as ``cost_nano_usd``: the
  leader's, never a follower's or a cache hit's).

Every execution that reached the backend (``attempts > 0``) is reported once to the
``usage`` sink, with the run and node it ran for (the single-flight leader's, the
first idempotent caller's, also when that caller left), as the call's outcome is final;
nothing else is (cache hits, shared results and replays ran nothing).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

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
from trellis.runtime.metrics import TOOL_CALLS, TOOL_DURATION
from trellis_toolgateway.batching import Batcher
from trellis_toolgateway.cache_keys import (
    args_fingerprint,
    cache_key,
    cache_tags,
    idempotency_scope,
)
from trellis_toolgateway.contracts import validate_args
from trellis_toolgateway.execution import PolicyRunner, failed_outcome
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
from trellis_toolgateway.registry import Entry, ToolLookup
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
        self._flights: SingleFlight[tuple[NodeOutcome, str, bool]] = SingleFlight()
        # Idempotent runs outliving their cancelled caller; held so they are not GC'd.
        self._background: set[asyncio.Task[NodeOutcome]] = set()

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
        """Run the tool under its policy (with the calls it is batched with, if it batches);
        report the execution if it reached the backend."""
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
        return outcome

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
        """Give idempotent runs whose callers left ``grace`` seconds to finish, then
        cancel the rest (their keys are abandoned: unknown, never run again), and the
        batches still gathering or under way."""
        runs = list(self._background)
        if runs:
            _, pending = await asyncio.wait(runs, timeout=grace) if grace > 0 else ((), runs)
            for run in pending:
                run.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._batcher.aclose()

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
        ``trellis_tool_calls_total{cache="hit"}``.
        """
        spec, tenant = entry.tool.spec, context.tenant()
        key = cache_key(
            tenant,
            spec.name,
            spec.version,
            entry.tool.cache_args(call.args),
            shared=spec.shared_cache,
        )
        tags = cache_tags(spec.name, tenant, shared=spec.shared_cache)
        mode = CacheMode.CACHE_MODE_USE if cache_mode in _READS else cache_mode

        async def flight() -> tuple[NodeOutcome, str, bool]:
            return await self._lookup_or_run(entry, call, run_id, key, mode, span)

        async def fill(result: tuple[NodeOutcome, str, bool]) -> None:
            outcome, _, write = result
            if write:
                await self._cache.store(key, outcome.output, ttl, tags, span)

        (result, cache_use, _), shared = await self._flights.do((key, mode), flight, then=fill)
        outcome = NodeOutcome()
        outcome.CopyFrom(result)  # each caller stamps its own copy
        if shared:
            span.set_attribute(ATTR_SHARED, True)
            outcome.attempts = 0
            outcome.cost_nano_usd = 0
            outcome.ClearField("usage")
            outcome.cache_hit = outcome.status == SUCCEEDED
            cache_use = "hit" if outcome.cache_hit else "miss"
        return outcome, cache_use

    async def _lookup_or_run(
        self,
        entry: Entry,
        call: Call,
        run_id: str,
        key: str,
        mode: common_pb2.CacheMode.ValueType,
        span: trace.Span,
    ) -> tuple[NodeOutcome, str, bool]:
        """The outcome, how the cache was used, and whether to write the outcome to it.

        The write is left to the flight's ``then``: callers are answered first, and
        the flight lingers until the entry is written (see ``policy.singleflight``).
        """
        cache_use, cache_ok = "bypass", True
        if self._cache is not None and mode in _READS:
            cache_use = "miss"
            cached, cache_ok = await self._cache.lookup(key, span)
            if cached is not None:
                return cached, "hit", False
        outcome = await self._execute(entry, call, run_id, span)
        # After a failed read, a write would most likely fail too and cost a second
        # cache timeout; skip it.
        write = self._cache is not None and cache_ok and mode in _WRITES
        return outcome, cache_use, write and outcome.status == SUCCEEDED

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
        span.set_attribute(ATTR_ATTEMPTS, outcome.attempts)
        if not succeeded:
            span.set_attribute("error.type", outcome.error.code)
            span.set_status(Status(StatusCode.ERROR, outcome.error.message))
