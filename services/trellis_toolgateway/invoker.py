"""The gateway's core: one tool call in, one ``NodeOutcome`` out. No gRPC here.

For each call: find the tool (unknown -> ``NotFound``), check the arguments against
its input schema (-> ``InvalidArgument`` with one field violation per problem), then
take one of three paths:

- side-effecting tool with an idempotency key: run once per (tenant, tool, key); a
  repeat gets the first outcome back, waiting for it if the first call still runs;
- cacheable tool: identical concurrent calls share one flight (``policy.singleflight``)
  which reads the result cache, runs the tool on a miss and stores a success;
- anything else: run it.

"Run it" is the execution policy, per tool: the circuit breaker (fast ``CIRCUIT_OPEN``
while the backend is known to be failing), the concurrency limit (wait in a bounded
line, ``RESOURCE_EXHAUSTED``/``TOOL_BUSY`` when it is full), then attempts bounded by
the tool's timeout and the caller's deadline, retried with backoff and full jitter
for retryable failures while the deadline allows. The output is checked against the
output schema. A tool that ran and failed is not an exception but a FAILED outcome
with a stable error code, so a plan can carry on.

Outcome fields this module decides:

- ``attempts``: backend attempts this call made; 0 when it ran nothing (cache hit,
  shared single-flight result, circuit open, idempotent replay keeps the first's).
- ``cost_nano_usd``: ``spec.cost_nano_usd`` per attempt that reached the backend (a
  paid API bills a retry too); 0 when nothing ran.
- ``cache_hit``: served without running: from the cache, or a single-flight follower
  sharing a successful result (both cost nothing, which is what the run's
  ``cache_hits`` tells the user).

The cache is fail-open: it exists to save time and money, so a cache that is down or
slow costs a warning, a metric and a span event, never the call.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from jsonschema import ValidationError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, timestamp, to_value
from trellis.runtime.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    TrellisError,
)
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import CACHE_REQUESTS, TOOL_CALLS, TOOL_DURATION
from trellis_toolgateway.cache_keys import (
    args_fingerprint,
    cache_key,
    cache_tags,
    idempotency_scope,
)
from trellis_toolgateway.policy.breaker import (
    BreakerConfig,
    Breakers,
    BreakerState,
    CircuitBreaker,
    Verdict,
)
from trellis_toolgateway.policy.clock import Clock, Sleep
from trellis_toolgateway.policy.concurrency import Limiters
from trellis_toolgateway.policy.idempotency import (
    DEFAULT_TTL,
    IdempotencyStore,
    KeyConflict,
    MemoryIdempotencyStore,
)
from trellis_toolgateway.policy.retry import Backoff
from trellis_toolgateway.policy.singleflight import SingleFlight
from trellis_toolgateway.registry import Entry, ToolLookup
from trellis_toolgateway.tools.base import Json, Spec, ToolError

log = get_logger(__name__)

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
CacheMode = common_pb2.CacheMode
NodeOutcome = common_pb2.NodeOutcome

_READS = (CacheMode.CACHE_MODE_UNSPECIFIED, CacheMode.CACHE_MODE_USE)
_WRITES = (*_READS, CacheMode.CACHE_MODE_REFRESH)

#: Span attributes added by the policy (besides the GenAI ones).
ATTR_BREAKER = "trellis.breaker.state"
ATTR_ATTEMPTS = "trellis.tool.attempts"
ATTR_SHARED = "trellis.single_flight.shared"
ATTR_REPLAY = "trellis.idempotent_replay"


class ResultCache(Protocol):
    """What the invoker needs of a cache; ``trellis.clients.cache.CacheClient`` is one."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None: ...


@dataclass(frozen=True)
class Call:
    """One tool call as the core sees it (``ToolCall`` without the wire types)."""

    tool: str
    args: dict[str, Json] = field(default_factory=dict)
    node_id: str = ""

    @classmethod
    def from_proto(cls, call: common_pb2.ToolCall) -> Call:
        return cls(tool=call.tool, args=from_struct(call.args), node_id=call.node_id)


def _field(path: Sequence[str | int]) -> str:
    """``["items", 2, "name"]`` -> ``args.items[2].name`` (google.rpc BadRequest style)."""
    out = "args"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _violations(errors: Sequence[ValidationError]) -> list[FieldViolation]:
    """One violation per problem; a missing property is reported on the property itself."""
    violations: list[FieldViolation] = []
    seen: set[tuple[str, str]] = set()
    for error in errors:
        path = list(error.absolute_path)
        items = [(_field(path), error.message)]
        if error.validator == "required" and isinstance(error.instance, Mapping):
            items = [
                (_field([*path, name]), f"{name!r} is a required property")
                for name in error.validator_value
                if name not in error.instance
            ]
        for item in items:
            if item not in seen:
                seen.add(item)
                violations.append(FieldViolation(*item))
    return violations


def validate_args(entry: Entry, args: dict[str, Json]) -> None:
    """Raise ``InvalidArgument(ARGS_INVALID)`` unless ``args`` match the input schema."""
    errors = sorted(
        entry.args_validator.iter_errors(args), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        name = entry.tool.spec.name
        raise InvalidArgument(
            f"arguments of {name!r} do not match its input schema: {errors[0].message}",
            reason="ARGS_INVALID",
            violations=_violations(errors),
            metadata={"tool": name},
        )


def _failed(
    code: str, message: str, *, retryable: bool = False, details: Mapping[str, str] | None = None
) -> NodeOutcome:
    error = common_pb2.Error(code=code, message=message, retryable=retryable, details=details)
    return NodeOutcome(status=FAILED, error=error)


def _stamp(outcome: NodeOutcome, node_id: str, started_at: timestamp_pb2.Timestamp) -> None:
    outcome.node_id = node_id
    outcome.started_at.CopyFrom(started_at)
    outcome.finished_at.CopyFrom(timestamp())


class Invoker:
    """Runs tool calls from ``registry`` with ``cache`` (None: no caching) and ``tracer``.

    Policy knobs are constructor parameters so tests (and later settings) set them:
    ``breaker`` thresholds and cool-down, retry ``backoff``, ``queue_per_slot`` (the
    waiting line of a tool is this many times its ``max_concurrency``), the
    ``idempotency`` store and ``idempotency_ttl``. ``clock``, ``sleep`` and ``rng``
    make time and jitter deterministic in tests.
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
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._tracer = tracer
        self._breakers = Breakers(breaker, clock=clock, on_change=_breaker_changed)
        self._backoff = backoff or Backoff()
        self._limiters = Limiters(queue_per_slot=queue_per_slot)
        self._idempotency = idempotency or MemoryIdempotencyStore(clock=clock)
        self._idempotency_ttl = idempotency_ttl
        self._flights: SingleFlight[tuple[NodeOutcome, str, bool]] = SingleFlight()
        self._sleep = sleep
        self._rng = rng or random.Random()

    def breaker(self, tool: str) -> CircuitBreaker:
        """The breaker of ``tool`` (for status pages, metrics and tests)."""
        return self._breakers.get(tool)

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
                f"unknown tool {call.tool!r}", reason="UNKNOWN_TOOL", metadata={"tool": call.tool}
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
                outcome = await self._run_once(entry, call, idempotency_key, started_at, span)
                cache_use = "bypass"
            else:
                ttl = (
                    min(entry.tool.cache_ttl_for(call.args), spec.cache_ttl)
                    if spec.cacheable
                    else 0
                )
                if ttl > 0:
                    outcome, cache_use = await self._cached(entry, call, ttl, cache_mode, span)
                else:
                    outcome, cache_use = await self._execute(entry, call.args, span), "bypass"
                _stamp(outcome, call.node_id, started_at)
            self._observe(spec.name, outcome, cache_use, time.perf_counter() - clock, span)
            return outcome

    # -- the three paths ---------------------------------------------------------------

    async def _run_once(
        self,
        entry: Entry,
        call: Call,
        idempotency_key: str,
        started_at: timestamp_pb2.Timestamp,
        span: trace.Span,
    ) -> NodeOutcome:
        """Side-effecting tool: the first outcome for this key, running the tool at most once.

        Only an outcome of a call that reached the backend is kept (even a FAILED one:
        the side effect may have happened, so at-most-once wins over a retry). When the
        first call ran nothing (circuit open, busy, cancelled, bad arguments) the key is
        released and the next call with it runs.
        """
        spec = entry.tool.spec
        key = idempotency_scope(context.tenant(), spec.name, idempotency_key)
        fingerprint = args_fingerprint(call.args)
        while True:
            try:
                if await self._idempotency.claim(key, fingerprint, self._idempotency_ttl):
                    break
            except KeyConflict:
                raise InvalidArgument(
                    f"idempotency key {idempotency_key!r} was already used for a call of "
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
                outcome = _failed(
                    "IDEMPOTENCY_PENDING",
                    f"an earlier call of {spec.name!r} with this idempotency key is still running",
                    retryable=True,
                )
                _stamp(outcome, call.node_id, started_at)
                return outcome
            if stored is not None:
                outcome = NodeOutcome.FromString(stored)
                outcome.node_id = call.node_id
                span.set_attribute(ATTR_REPLAY, True)
                return outcome
            # The first call ran nothing and let go of the key: try to own it.
        try:
            outcome = await self._execute(entry, call.args, span)
        except BaseException:
            await self._idempotency.release(key)
            raise
        _stamp(outcome, call.node_id, started_at)
        if outcome.attempts > 0:
            await self._idempotency.complete(key, outcome.SerializeToString())
        else:
            await self._idempotency.release(key)
        return outcome

    async def _cached(
        self,
        entry: Entry,
        call: Call,
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
        key = cache_key(tenant, spec.name, spec.version, call.args, shared=spec.shared_cache)
        tags = cache_tags(spec.name, tenant, shared=spec.shared_cache)
        mode = CacheMode.CACHE_MODE_USE if cache_mode in _READS else cache_mode

        async def flight() -> tuple[NodeOutcome, str, bool]:
            return await self._lookup_or_run(entry, call.args, key, mode, span)

        async def fill(result: tuple[NodeOutcome, str, bool]) -> None:
            outcome, _, write = result
            if write:
                await self._store(key, outcome.output, ttl, tags, span)

        (result, cache_use, _), shared = await self._flights.do((key, mode), flight, then=fill)
        outcome = NodeOutcome()
        outcome.CopyFrom(result)  # each caller stamps its own copy
        if shared:
            span.set_attribute(ATTR_SHARED, True)
            outcome.attempts = 0
            outcome.cost_nano_usd = 0
            outcome.cache_hit = outcome.status == SUCCEEDED
            cache_use = "hit" if outcome.cache_hit else "miss"
        return outcome, cache_use

    async def _lookup_or_run(
        self,
        entry: Entry,
        args: dict[str, Json],
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
            cached, cache_ok = await self._lookup(key, span)
            if cached is not None:
                return cached, "hit", False
        outcome = await self._execute(entry, args, span)
        # After a failed read, a write would most likely fail too and cost a second
        # cache timeout; skip it.
        write = self._cache is not None and cache_ok and mode in _WRITES
        return outcome, cache_use, write and outcome.status == SUCCEEDED

    # -- execution policy --------------------------------------------------------------

    async def _execute(self, entry: Entry, args: dict[str, Json], span: trace.Span) -> NodeOutcome:
        """Breaker, then a slot of the tool's concurrency, then attempts with retries."""
        spec = entry.tool.spec
        breaker = self._breakers.get(spec.name)
        if not breaker.allows():  # fail fast, without even queueing for a slot
            span.set_attribute(ATTR_BREAKER, breaker.state.value)
            return _circuit_open(spec, breaker)
        limiter = self._limiters.get(spec)
        if limiter is None:
            outcome = await self._attempts(entry, args, breaker, span)
        else:
            try:
                async with asyncio.timeout(context.remaining()):
                    await limiter.acquire()  # ResourceExhausted(TOOL_BUSY) when the line is full
            except TimeoutError:
                return _failed(
                    "TOOL_TIMEOUT",
                    f"{spec.name}: no free slot (max_concurrency {spec.max_concurrency}) "
                    "before the call's deadline",
                    retryable=True,
                )
            # The slot is held across retries: a failing backend gets no more than
            # max_concurrency calls at once, and a retry does not jump the line.
            try:
                outcome = await self._attempts(entry, args, breaker, span)
            finally:
                limiter.release()
        span.set_attribute(ATTR_BREAKER, breaker.state.value)
        return outcome

    async def _attempts(
        self, entry: Entry, args: dict[str, Json], breaker: CircuitBreaker, span: trace.Span
    ) -> NodeOutcome:
        """Attempts until success, a non-retryable failure, ``spec.retries`` retries, the
        breaker opening, or a backoff that would end past the deadline."""
        spec = entry.tool.spec
        attempts, outcome = 0, None
        while True:
            permit = breaker.acquire()
            if permit is None:  # opened (or another probe runs): stop here
                if outcome is None:
                    outcome = _circuit_open(spec, breaker)
                break
            attempts += 1
            try:
                outcome, verdict = await self._attempt(entry, args, span)
            except BaseException:  # contract violation or cancelled: says nothing of health
                breaker.record(permit, Verdict.IGNORED)
                raise
            breaker.record(permit, verdict)
            if outcome.status == SUCCEEDED or not outcome.error.retryable:
                break
            if attempts > spec.retries:
                break
            delay = self._backoff.delay(attempts, self._rng)
            left = context.remaining()
            if left is not None and delay >= left:
                break  # the retry could not finish in time; the caller gets this failure
            span.add_event(
                "trellis.tool.retry",
                {
                    "trellis.attempt": attempts,
                    "trellis.backoff_s": delay,
                    "error.type": outcome.error.code,
                },
            )
            await self._sleep(delay)
        outcome.attempts = attempts
        outcome.cost_nano_usd = attempts * spec.cost_nano_usd
        return outcome

    async def _attempt(
        self, entry: Entry, args: dict[str, Json], span: trace.Span
    ) -> tuple[NodeOutcome, Verdict]:
        """One backend call and what it says about the backend's health."""
        spec = entry.tool.spec
        bound, by_deadline = spec.timeout, False
        left = context.remaining()
        if left is not None and left < bound:
            bound, by_deadline = left, True
        try:
            async with asyncio.timeout(max(bound, 0.0)):
                output = await entry.tool.run(args)
        except InvalidArgument:
            raise  # the call broke the tool's contract: an RPC error, not an outcome
        except TimeoutError:
            outcome = _failed(
                "TOOL_TIMEOUT", f"{spec.name} did not finish within {bound:.3g}s", retryable=True
            )
            # Cut short by the caller's deadline: no verdict on the backend.
            return outcome, Verdict.IGNORED if by_deadline else Verdict.FAILURE
        except ToolError as error:
            outcome = _failed(
                error.code, error.message, retryable=error.retryable, details=error.details
            )
            # A deliberate, non-retryable answer (e.g. division by zero) means the
            # backend is up; only retryable errors speak of its health.
            return outcome, Verdict.FAILURE if error.retryable else Verdict.SUCCESS
        except TrellisError as error:  # a remote backend's transport or server error
            return _failed(error.reason, error.message, retryable=error.retryable), Verdict.FAILURE
        except Exception as error:  # a broken tool is a FAILED node, not a crash
            log.exception("tool raised", tool=spec.name)
            span.record_exception(error)
            outcome = _failed("TOOL_FAILED", f"{spec.name} failed: {type(error).__name__}: {error}")
            return outcome, Verdict.FAILURE
        # Output contract failures are the tool's contract, not the backend's health.
        problems = list(entry.output_validator.iter_errors(output))
        if problems:
            return _failed(
                "OUTPUT_CONTRACT",
                f"{spec.name} returned output that breaks its schema: {problems[0].message}",
            ), Verdict.IGNORED
        try:
            value = to_value(output)
        except Exception as error:  # e.g. a non-JSON type from a tool
            message = f"{spec.name} returned non-JSON output: {error}"
            return _failed("OUTPUT_CONTRACT", message), Verdict.IGNORED
        return NodeOutcome(status=SUCCEEDED, output=value), Verdict.SUCCESS

    # -- cache -------------------------------------------------------------------------

    async def _lookup(self, key: str, span: trace.Span) -> tuple[NodeOutcome | None, bool]:
        """The cached outcome (None on a miss) and whether the cache answered at all."""
        assert self._cache is not None
        try:
            stored = await self._cache.get(key)
        except Exception as error:  # fail-open, see module docstring
            self._cache_failed("get", error, span)
            return None, False
        if stored is None:
            return None, True
        try:
            output = struct_pb2.Value.FromString(stored)
        except DecodeError as error:  # a bad entry: overwrite it with a fresh result
            self._cache_failed("decode", error, span)
            return None, True
        return NodeOutcome(status=SUCCEEDED, output=output, cache_hit=True), True

    async def _store(
        self, key: str, output: struct_pb2.Value, ttl: float, tags: list[str], span: trace.Span
    ) -> None:
        assert self._cache is not None
        try:
            await self._cache.set(key, output.SerializeToString(), ttl, tags)
        except Exception as error:  # fail-open
            self._cache_failed("set", error, span)

    @staticmethod
    def _cache_failed(operation: str, error: Exception, span: trace.Span) -> None:
        kind = error.reason if isinstance(error, TrellisError) else type(error).__name__
        log.warning(
            "cache failed; running without it", operation=operation, error=kind, message=str(error)
        )
        CACHE_REQUESTS.labels(result="error").inc()
        if span.is_recording():  # a write-behind may fail after the call's span ended
            span.add_event(
                "trellis.cache.error",
                {"trellis.cache.operation": operation, "error.type": kind, "message": str(error)},
            )

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


def _circuit_open(spec: Spec, breaker: CircuitBreaker) -> NodeOutcome:
    wait = breaker.retry_after()
    return _failed(
        "CIRCUIT_OPEN",
        f"{spec.name} is failing; its circuit is open, next try in {wait:.1f}s",
        retryable=True,
        details={"tool": spec.name, "retry_after_seconds": f"{wait:.3f}"},
    )


def _breaker_changed(tool: str, state: BreakerState) -> None:
    """Breaker transitions are rare and worth a log line (and, later, a gauge)."""
    if state is BreakerState.OPEN:
        log.warning("circuit opened", tool=tool)
    else:
        log.info("circuit state changed", tool=tool, state=state.value)
