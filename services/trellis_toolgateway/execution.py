"""Running one tool call under its execution policy: breaker, concurrency, retries.

The circuit breaker fails fast (``CIRCUIT_OPEN``) while the backend is known to be
failing; the concurrency limit makes calls wait in a bounded line
(``RESOURCE_EXHAUSTED``/``TOOL_BUSY`` when it is full); attempts are bounded by the
tool's timeout and the caller's deadline and retried with backoff and full jitter for
retryable failures while the deadline allows. The output is checked against the
output schema and its size cap (``Spec.max_result_bytes``, serialized bytes:
``OUTPUT_TOO_LARGE`` beyond it, before anything is cached or sent). A tool that ran and
failed is a FAILED outcome with a stable code; its error message and details are
redacted (``trellis.runtime.redact``) like every error the gateway hands out.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping

from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_value
from trellis.runtime.errors import InvalidArgument, TrellisError
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import TOOL_BREAKER_STATE
from trellis.runtime.redact import redact_details, redact_text
from trellis_toolgateway.policy.breaker import (
    BreakerConfig,
    Breakers,
    BreakerState,
    CircuitBreaker,
    Verdict,
)
from trellis_toolgateway.policy.clock import Clock, Sleep
from trellis_toolgateway.policy.concurrency import Limiters
from trellis_toolgateway.policy.retry import Backoff
from trellis_toolgateway.registry import Entry
from trellis_toolgateway.tools.base import DEFAULT_MAX_RESULT_BYTES, Json, Spec, ToolError

log = get_logger(__name__)

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
NodeOutcome = common_pb2.NodeOutcome

#: Span attributes set here.
ATTR_BREAKER = "trellis.breaker.state"

OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
#: A call cut short by its caller's deadline (the caller's limit, not the tool's fault).
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


def failed_outcome(
    code: str, message: str, *, retryable: bool = False, details: Mapping[str, str] | None = None
) -> NodeOutcome:
    error = common_pb2.Error(
        code=code,
        message=redact_text(message),
        retryable=retryable,
        details=redact_details(details or {}),
    )
    return NodeOutcome(status=FAILED, error=error)


def too_large(spec: Spec, size: int | str, limit: int) -> NodeOutcome:
    """The outcome of a call whose output is over ``limit`` bytes (not retryable: the same
    call would return the same output)."""
    return failed_outcome(
        OUTPUT_TOO_LARGE,
        f"{spec.name} returned {size} bytes, over its limit of {limit} bytes",
        details={"tool": spec.name, "limit_bytes": str(limit)},
    )


class PolicyRunner:
    """Runs calls of any tool under that tool's breaker, concurrency limit and retries."""

    def __init__(
        self,
        *,
        breaker: BreakerConfig | None,
        backoff: Backoff | None,
        queue_per_slot: int,
        clock: Clock,
        sleep: Sleep,
        rng: random.Random | None,
    ) -> None:
        self.breakers = Breakers(breaker, clock=clock, on_change=_breaker_changed)
        self._backoff = backoff or Backoff()
        self._limiters = Limiters(queue_per_slot=queue_per_slot)
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def run(self, entry: Entry, args: dict[str, Json], span: trace.Span) -> NodeOutcome:
        """Breaker, then a slot of the tool's concurrency, then attempts with retries."""
        spec = entry.tool.spec
        breaker = self.breakers.get(spec.name)
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
                return failed_outcome(
                    DEADLINE_EXCEEDED,
                    f"{spec.name}: no free slot (max_concurrency {spec.max_concurrency}) "
                    "before the call's deadline",
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
            if by_deadline:  # the caller's deadline, not the tool: no verdict on the backend
                message = f"{spec.name} was still running at the caller's deadline"
                return failed_outcome(DEADLINE_EXCEEDED, message), Verdict.IGNORED
            outcome = failed_outcome(
                "TOOL_TIMEOUT", f"{spec.name} did not finish within {bound:.3g}s", retryable=True
            )
            return outcome, Verdict.FAILURE
        except ToolError as error:
            outcome = failed_outcome(
                error.code, error.message, retryable=error.retryable, details=error.details
            )
            # A deliberate, non-retryable answer (e.g. division by zero) means the
            # backend is up; only retryable errors speak of its health.
            return outcome, Verdict.FAILURE if error.retryable else Verdict.SUCCESS
        except TrellisError as error:  # a remote backend's transport or server error
            return failed_outcome(
                error.reason, error.message, retryable=error.retryable
            ), Verdict.FAILURE
        except Exception as error:  # a broken tool is a FAILED node, not a crash
            log.exception("tool raised", tool=spec.name)
            span.record_exception(error)
            outcome = failed_outcome(
                "TOOL_FAILED", f"{spec.name} failed: {type(error).__name__}: {error}"
            )
            return outcome, Verdict.FAILURE
        # Output contract failures are the tool's contract, not the backend's health.
        limit = spec.max_result_bytes or DEFAULT_MAX_RESULT_BYTES
        if isinstance(output, str | bytes) and len(output) > limit:  # cheap early answer
            return too_large(spec, f"more than {limit}", limit), Verdict.IGNORED
        problems = list(entry.output_validator.iter_errors(output))
        if problems:
            return failed_outcome(
                "OUTPUT_CONTRACT",
                f"{spec.name} returned output that breaks its schema: {problems[0].message}",
            ), Verdict.IGNORED
        try:
            value = to_value(output)
        except Exception as error:  # e.g. a non-JSON type from a tool
            message = f"{spec.name} returned non-JSON output: {error}"
            return failed_outcome("OUTPUT_CONTRACT", message), Verdict.IGNORED
        size = value.ByteSize()
        if size > limit:
            return too_large(spec, size, limit), Verdict.IGNORED
        return NodeOutcome(status=SUCCEEDED, output=value), Verdict.SUCCESS


def _circuit_open(spec: Spec, breaker: CircuitBreaker) -> NodeOutcome:
    wait = breaker.retry_after()
    return failed_outcome(
        "CIRCUIT_OPEN",
        f"{spec.name} is failing; its circuit is open, next try in {wait:.1f}s",
        retryable=True,
        details={"tool": spec.name, "retry_after_seconds": f"{wait:.3f}"},
    )


_GAUGE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def _breaker_changed(tool: str, state: BreakerState) -> None:
    """Breaker transitions are rare: a log line and ``trellis_tool_breaker_state``."""
    TOOL_BREAKER_STATE.labels(tool=tool).set(_GAUGE_VALUE[state])
    if state is BreakerState.OPEN:
        log.warning("circuit opened", tool=tool)
    else:
        log.info("circuit state changed", tool=tool, state=state.value)
