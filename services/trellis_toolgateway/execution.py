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

A call of a model tool also brings back the model tokens it spent (``Metered``, or on
its ``ToolError``): every attempt's are added to the outcome's ``usage``. The tool runs
with ``current_call()`` telling it the call's run, node, idempotency key and attempt.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_value
from trellis.runtime.errors import InvalidArgument, TrellisError
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import TOOL_BREAKER_STATE
from trellis.runtime.redact import redact_details, redact_text
from trellis.runtime.shares import split
from trellis.runtime.usage import add_usage, is_empty
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
from trellis_toolgateway.tools.base import (
    DEFAULT_MAX_RESULT_BYTES,
    NO_CALL,
    BatchItem,
    BatchTool,
    CallInfo,
    ItemResult,
    Json,
    Metered,
    Spec,
    Tool,
    ToolError,
    calling,
)

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
    """Runs calls of any tool under that tool's breaker, concurrency limit and retries.

    ``run`` is one call; ``run_batch`` several calls of a batching tool sent together
    (``batching``): one breaker decision, one concurrency slot and one verdict per backend
    request, while each call keeps its own outcome, retries, attempts, cost share (the
    request's cost split exactly, ``trellis.runtime.shares``) and model usage. A retry
    sends only the calls that need one; a call left alone is an ordinary single call.
    """

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

    async def run(
        self, entry: Entry, args: dict[str, Json], span: trace.Span, call: CallInfo = NO_CALL
    ) -> NodeOutcome:
        """Breaker, then a slot of the tool's concurrency, then attempts with retries."""
        (outcome,) = await self.run_batch(entry, [BatchItem(args, call)], span)
        return outcome

    async def run_batch(
        self, entry: Entry, items: Sequence[BatchItem], span: trace.Span
    ) -> list[NodeOutcome]:
        """``run`` for several calls of one tool at once: their outcomes, in order."""
        spec = entry.tool.spec
        breaker = self.breakers.get(spec.name)
        if not breaker.allows():  # fail fast, without even queueing for a slot
            span.set_attribute(ATTR_BREAKER, breaker.state.value)
            return [_circuit_open(spec, breaker) for _ in items]
        limiter = self._limiters.get(spec)
        if limiter is None:
            outcomes = await self._attempts(entry, items, breaker, span)
        else:
            try:
                async with asyncio.timeout(context.remaining()):
                    await limiter.acquire()  # ResourceExhausted(TOOL_BUSY) when the line is full
            except TimeoutError:
                message = (
                    f"{spec.name}: no free slot (max_concurrency {spec.max_concurrency}) "
                    "before the call's deadline"
                )
                return [failed_outcome(DEADLINE_EXCEEDED, message) for _ in items]
            # The slot is held across retries: a failing backend gets no more than
            # max_concurrency calls at once, and a retry does not jump the line.
            try:
                outcomes = await self._attempts(entry, items, breaker, span)
            finally:
                limiter.release()
        span.set_attribute(ATTR_BREAKER, breaker.state.value)
        return outcomes

    async def _attempts(
        self,
        entry: Entry,
        items: Sequence[BatchItem],
        breaker: CircuitBreaker,
        span: trace.Span,
    ) -> list[NodeOutcome]:
        """Attempts until each call succeeded, failed for good, used its ``spec.retries``
        retries, or the breaker opened, or a backoff would end past the deadline."""
        spec = entry.tool.spec
        count = len(items)
        last: list[NodeOutcome | None] = [None] * count
        attempts, costs = [0] * count, [0] * count
        usage = [common_pb2.Usage() for _ in items]
        pending = list(range(count))
        round_ = 0
        while pending:
            permit = breaker.acquire()
            if permit is None:  # opened (or another probe runs): stop here
                break
            round_ += 1
            sent = [
                BatchItem(items[i].args, replace(items[i].call, attempt=round_)) for i in pending
            ]
            try:
                results, verdict = await self._attempt(entry, sent, span)
            except BaseException:  # contract violation or cancelled: says nothing of health
                breaker.record(permit, Verdict.IGNORED)
                raise
            breaker.record(permit, verdict)
            shares = split(spec.request_cost(len(sent)), [1] * len(sent))
            retry = []
            for index, outcome, cost in zip(pending, results, shares, strict=True):
                attempts[index] += 1
                costs[index] += cost
                add_usage(usage[index], outcome.usage)
                last[index] = outcome
                if (
                    outcome.status != SUCCEEDED
                    and outcome.error.retryable
                    and attempts[index] <= spec.retries
                ):
                    retry.append(index)
            pending = retry
            if not pending:
                break
            delay = self._backoff.delay(round_, self._rng)
            left = context.remaining()
            if left is not None and delay >= left:
                break  # the retry could not finish in time; the caller gets this failure
            span.add_event(
                "trellis.tool.retry",
                {
                    "trellis.attempt": round_,
                    "trellis.backoff_s": delay,
                    "trellis.batch.size": len(pending),
                    "error.type": last[pending[0]].error.code,  # type: ignore[union-attr]
                },
            )
            await self._sleep(delay)
        outcomes = []
        for index in range(count):
            outcome = last[index] or _circuit_open(spec, breaker)
            outcome.attempts = attempts[index]
            outcome.cost_nano_usd = costs[index]
            if usage[index].model or not is_empty(usage[index]):  # a model tool's call
                outcome.usage.CopyFrom(usage[index])
            else:
                outcome.ClearField("usage")
            outcomes.append(outcome)
        return outcomes

    async def _attempt(
        self, entry: Entry, items: Sequence[BatchItem], span: trace.Span
    ) -> tuple[list[NodeOutcome], Verdict]:
        """One backend request (``run`` for one call, ``run_batch`` for several): each
        call's outcome, and what the request says about the backend's health."""
        tool, spec = entry.tool, entry.tool.spec
        bound, by_deadline = spec.timeout, False
        left = context.remaining()
        if left is not None and left < bound:
            bound, by_deadline = left, True
        try:
            async with asyncio.timeout(max(bound, 0.0)):
                if len(items) == 1:  # the usual case: no task of its own
                    produced = [await _alone(tool, items[0])]
                elif isinstance(tool, BatchTool):
                    produced = await tool.run_batch(items)
                else:  # a tool that takes one at a time: each on its own
                    produced = list(await asyncio.gather(*(_alone(tool, i) for i in items)))
        except InvalidArgument:
            raise  # the call broke the tool's contract: an RPC error, not an outcome
        except Exception as error:  # the whole request failed: every call with it
            outcome, verdict = self._failed(spec, error, bound, by_deadline, span)
            return [_copy(outcome) for _ in items], verdict
        judged = [self._judge(entry, result) for result in produced]
        verdicts = {verdict for _, verdict in judged}
        verdict = (
            Verdict.SUCCESS
            if Verdict.SUCCESS in verdicts
            else Verdict.FAILURE
            if Verdict.FAILURE in verdicts
            else Verdict.IGNORED
        )
        return [outcome for outcome, _ in judged], verdict

    @staticmethod
    def _failed(
        spec: Spec, error: Exception, bound: float, by_deadline: bool, span: trace.Span
    ) -> tuple[NodeOutcome, Verdict]:
        """The outcome of a request that raised ``error``."""
        if isinstance(error, TimeoutError):
            if by_deadline:  # the caller's deadline, not the tool: no verdict on the backend
                message = f"{spec.name} was still running at the caller's deadline"
                return failed_outcome(DEADLINE_EXCEEDED, message), Verdict.IGNORED
            outcome = failed_outcome(
                "TOOL_TIMEOUT", f"{spec.name} did not finish within {bound:.3g}s", retryable=True
            )
            return outcome, Verdict.FAILURE
        if isinstance(error, ToolError):
            return _tool_failure(error)
        if isinstance(error, TrellisError):  # a remote backend's transport or server error
            return failed_outcome(
                error.reason, error.message, retryable=error.retryable
            ), Verdict.FAILURE
        log.error("tool raised", tool=spec.name, exc_info=error)
        span.record_exception(error)
        outcome = failed_outcome(
            "TOOL_FAILED", f"{spec.name} failed: {type(error).__name__}: {error}"
        )
        return outcome, Verdict.FAILURE

    @staticmethod
    def _judge(entry: Entry, produced: ItemResult) -> tuple[NodeOutcome, Verdict]:
        """One call's result (an output, ``Metered``, or its ``ToolError``) as its outcome,
        its output checked against the output schema and the size cap."""
        if isinstance(produced, ToolError):
            return _tool_failure(produced)
        spec = entry.tool.spec
        usage = None
        if isinstance(produced, Metered):
            produced, usage = produced.output, produced.usage
        outcome, verdict = _checked(entry, spec, produced)
        if usage is not None:
            outcome.usage.CopyFrom(usage)
        return outcome, verdict


async def _alone(tool: Tool, item: BatchItem) -> ItemResult:
    """One call's result, its ``ToolError`` included (so one call's failure is its own)."""
    with calling(item.call):
        try:
            return await tool.run(item.args)
        except ToolError as error:
            return error


def _tool_failure(error: ToolError) -> tuple[NodeOutcome, Verdict]:
    outcome = failed_outcome(
        error.code, error.message, retryable=error.retryable, details=error.details
    )
    if error.usage is not None:
        outcome.usage.CopyFrom(error.usage)
    # A deliberate, non-retryable answer (e.g. division by zero) means the backend is up;
    # only retryable errors speak of its health.
    return outcome, Verdict.FAILURE if error.retryable else Verdict.SUCCESS


def _checked(entry: Entry, spec: Spec, output: Json) -> tuple[NodeOutcome, Verdict]:
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


def _copy(outcome: NodeOutcome) -> NodeOutcome:
    copy = NodeOutcome()
    copy.CopyFrom(outcome)
    return copy


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
