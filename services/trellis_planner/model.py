"""One model call: streamed through the ``openai`` client, traced, bounded, mapped.

Before anything is sent, the tenant's budget is checked (``budget.py``: over budget →
BUDGET_EXCEEDED, no call made) with the call's estimated tokens (input estimated from
the messages, output the expected output tokens) and the call's ``usage_id`` as the
reservation, so the estimate is held until the call's usage is recorded under that id.
Then each attempt, the requested model first and then each fallback model, takes its
place under the model's rate limits (``ratelimit.py``: it may wait within the request's
deadline, or the model timeout when there is none, else MODEL_RATE_LIMITED with
RetryInfo) and sends the request. The ``openai`` client itself retries 429, 5xx and
connection errors (``TRELLIS_MODEL_MAX_RETRIES``) honouring Retry-After; when an
attempt still fails with a retryable error (MODEL_RATE_LIMITED, MODEL_UNAVAILABLE,
MODEL_TIMEOUT) the next fallback model is tried, if the request has time left.

Models whose breaker is open (``breaker.py``: they failed several calls in a row) are
skipped for the next one without a request; when every model of the call is skipped the
call fails at once, MODEL_UNAVAILABLE with RetryInfo (the first cool-down to end). Each
attempt's result (and, once a stream opened, how it ended) is recorded with the breakers.

Fallback happens only while no response stream is open. An opened stream may already
be billed and its text may already be with the caller, and a call has one ledger row
for one model: so once a stream is open its failure is final, even before its first token.
One call is one budget check and (once a stream opened) one ledger row, both under its
``usage_id``, whichever of its models answered; a call that never opened a stream
records nothing and its reservation lapses in cost accounting.

Every attempt is a ``chat {model}`` CLIENT span with the GenAI semantic-convention
attributes (and time to first chunk), is bounded by the service's model timeout and by
the incoming request's deadline, and turns the client's exceptions into Trellis errors
with stable reasons (MODEL_TIMEOUT, MODEL_RATE_LIMITED, MODEL_UNAVAILABLE, ...; a stream
event that is not JSON, or not a chunk the planner can read, is MODEL_BAD_RESPONSE). Each
attempt that sent a request is observed in ``gen_ai_client_operation_duration_seconds``
and one that answered in ``gen_ai_client_token_usage``. Usage comes from the stream's
final usage chunk; when the endpoint sends none, or the call stops early, it is
estimated and marked so. A caller that only wants the whole answer (a model tool's
Generate) makes one unstreamed request instead (``streamed=False``), read and checked the
same way (``chunks.read_completion``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from openai import APITimeoutError, AsyncOpenAI
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from trellis.clients.budget_check import BudgetPolicy
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.errors import (
    DeadlineExceeded,
    TrellisError,
    Unavailable,
)
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import GEN_AI_OPERATION_DURATION, GEN_AI_TOKEN_USAGE, MODEL_FALLBACKS
from trellis.runtime.tokens import estimate_tokens
from trellis_planner.breaker import ALLOWED, Admission, ModelBreakers, verdict_of
from trellis_planner.budget import BudgetChecker, require_budget
from trellis_planner.chunks import ChunkParts, MalformedChunk, read_chunk, read_completion
from trellis_planner.model_errors import estimate_input_tokens, model_error
from trellis_planner.ratelimit import RateLimits

log = get_logger(__name__)

PROVIDER = "openai"
OPERATION = "chat"
#: The reason of a call cut short by the caller's deadline.
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
#: How an unstreamed request ends when it is cut while the model works on it.
_CUT = (asyncio.CancelledError, TimeoutError, APITimeoutError)
#: Failures after which the next fallback model is tried.
FALLBACK_REASONS = frozenset({"MODEL_RATE_LIMITED", "MODEL_UNAVAILABLE", "MODEL_TIMEOUT"})

#: A chat message: role and content, and for tool calling ``tool_calls`` / ``tool_call_id``.
Message = dict[str, Any]


@dataclass
class ChatResult:
    """What one call produced; complete once its ``async with`` block has exited."""

    #: The model asked for by the attempt that answered (a fallback, if one was used).
    request_model: str
    model: str = ""
    text: str = ""
    #: What the model wrote besides text (tool-call names and arguments, a refusal):
    #: counted when the tokens are estimated.
    other_output: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    #: True when the tokens were estimated (no usage chunk, or the stream stopped early).
    estimated: bool = False
    time_to_first_token: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    #: Models tried before ``request_model`` that failed (empty: the first one answered).
    failed_models: list[str] = field(default_factory=list)
    #: Models not tried because their breaker was open.
    skipped_models: list[str] = field(default_factory=list)


class ChatCall:
    """``async with model.chat(...) as call: async for parts in call.deltas(): ...``

    ``options`` are extra request fields (``tools``, ``tool_choice``,
    ``parallel_tool_calls``, ``response_format``)."""

    def __init__(
        self,
        model: ChatModel,
        messages: Sequence[Message],
        *,
        models: Sequence[str],
        attributes: dict[str, Any],
        usage_id: str = "",
        options: Mapping[str, Any] | None = None,
        expected_output_tokens: int | None = None,
        streamed: bool = True,
    ) -> None:
        self._model = model
        #: False: one unstreamed request, whose whole answer ``deltas`` yields at once.
        self._streamed = streamed
        self._answer: Any = None
        #: The ledger row (and budget reservation) of this call; "" for none.
        self.usage_id = usage_id
        #: Extra parameters of the request (response_format, temperature, ...).
        self._options = dict(options or {})
        #: Output the budget check estimates (None: the model's expected output).
        self._expected_output = expected_output_tokens
        self._messages = list(messages)
        self._options = dict(options or {})
        self._models = list(models)
        self._attributes = attributes
        self.result = ChatResult(request_model=self._models[0], model=self._models[0])
        #: Whether the endpoint answered (tokens may have been spent).
        self.opened = False
        self._stream: Any = None
        self._span: trace.Span | None = None
        self._deadline = 0.0
        #: When the current attempt's request was sent (None: not sent).
        self._started: float | None = None
        self._usage_seen = False
        self._finished = False
        self._error: BaseException | None = None
        self._reserved = False
        #: The current attempt is bounded by the caller's deadline, not the model timeout.
        self._by_deadline = False
        #: An unstreamed request was sent and then cut (timed out, cancelled) unanswered.
        self._cut = False
        #: The breaker's leave for the model whose stream is open.
        self._admission: Admission = ALLOWED
        self._input_tokens = estimate_input_tokens(self._messages, self._options)

    def usage(self) -> common_pb2.Usage:
        """What the call used, as it is recorded: zero tokens when the endpoint never
        answered (nothing was spent), else the result's (estimated if so marked). An
        unstreamed request cut while the model worked on it had its prompt read: its
        input is estimated (the answer, never seen, is not)."""
        result = self.result
        usage = common_pb2.Usage(model=result.model or result.request_model)
        if self.opened:
            usage.input_tokens = result.input_tokens
            usage.output_tokens = result.output_tokens
            usage.cached_input_tokens = result.cached_input_tokens
            usage.estimated = result.estimated
        elif self._cut:
            usage.input_tokens = self._input_tokens
            usage.estimated = True
        return usage

    async def reserve(self) -> None:
        """The budget check (BUDGET_EXCEEDED: the call must not be made); once per call,
        and done by ``async with`` when not called before."""
        if self._reserved:
            return
        model = self._model
        if model.budget is not None:
            await require_budget(
                model.budget,
                model.budget_policy,
                self._models[0],
                input_tokens=self._input_tokens,
                output_tokens=(
                    model.expected_output_tokens
                    if self._expected_output is None
                    else self._expected_output
                ),
                reservation_id=self.usage_id,
            )
        self._reserved = True

    async def __aenter__(self) -> ChatCall:
        await self.reserve()
        input_tokens = self._input_tokens
        breakers = self._model.breakers
        failure: TrellisError | None = None
        waits: list[float] = []
        for name in self._models:
            admission = ALLOWED if breakers is None else await breakers.admit(name)
            if not admission.allowed:
                self.result.skipped_models.append(name)
                waits.append(admission.retry_after)
                log.info("model skipped: its breaker is open", model=name)
                continue
            if failure is not None:
                left = context.remaining()
                if left is not None and left <= 0:
                    break
                previous = self.result.request_model
                self.result.failed_models.append(previous)
                MODEL_FALLBACKS.labels(previous, name).inc()
                log.warning(
                    "model failed; trying the next fallback model",
                    model=previous,
                    fallback=name,
                    reason=failure.reason,
                )
            try:
                await self._attempt(name, input_tokens)
            except TrellisError as error:
                await self._judge(name, admission, error.reason)
                if error.reason not in FALLBACK_REASONS:
                    raise
                failure = error
            except BaseException:
                await self._judge(name, admission, "DEADLINE_EXCEEDED")  # cancelled: neutral
                raise
            else:
                self._admission = admission
                return self
        if failure is not None:
            raise failure
        skipped = ", ".join(self.result.skipped_models)
        raise Unavailable(
            f"no model to call: the breakers of {skipped} are open after repeated failures",
            reason="MODEL_UNAVAILABLE",
            metadata={"model": self._models[0], "skipped_models": skipped},
            retry_delay=min(waits, default=None),
        )

    async def _judge(self, name: str, admission: Admission, reason: str | None) -> None:
        """Tell the breakers how a call of ``name`` went (``reason``: None if it answered)."""
        breakers = self._model.breakers
        if breakers is not None:
            await breakers.record(name, admission, verdict_of(reason))

    async def _attempt(self, name: str, input_tokens: int) -> None:
        """One model: rate limits, then the request; raises the mapped error."""
        model = self._model
        result = self.result
        result.request_model = result.model = name
        attributes = {**self._attributes, "gen_ai.request.model": name}
        if result.failed_models:
            attributes["trellis.fallback_from"] = result.failed_models[-1]
        if result.skipped_models:
            attributes["trellis.breaker_skipped"] = list(result.skipped_models)
        self._span = model.tracer.start_span(
            f"{OPERATION} {name}", kind=SpanKind.CLIENT, attributes=attributes
        )
        self._started, self._error, self._by_deadline = None, None, False
        try:
            if model.rate_limits is not None:
                left = context.remaining()
                waited = await model.rate_limits.admit(
                    name, input_tokens, max_wait=model.timeout if left is None else left
                )
                if waited:
                    self._span.set_attribute("trellis.rate_limit.wait_s", waited)
            self._started = time.monotonic()
            budget = model.timeout
            left = context.remaining()
            if left is not None and left < budget:
                budget, self._by_deadline = left, True
            self._deadline = self._started + budget
            if budget <= 0:
                raise DeadlineExceeded(
                    "no time left for the model call",
                    reason=DEADLINE_EXCEEDED,
                    metadata={"model": name},
                )
            async with asyncio.timeout_at(self._loop_deadline()):
                if self._streamed:
                    self._stream = await model.client.chat.completions.create(
                        model=name,
                        messages=self._messages,  # type: ignore[arg-type]
                        stream=True,
                        stream_options={"include_usage": True},
                        timeout=budget,
                        **self._options,
                    )
                else:
                    self._answer = await model.client.chat.completions.create(
                        model=name,
                        messages=self._messages,  # type: ignore[arg-type]
                        timeout=budget,
                        **self._options,
                    )
        except BaseException as error:
            if not self._streamed and self._started is not None:
                self._cut = isinstance(error, _CUT)
            mapped = self._fail(error, end=True)
            if mapped is error:
                raise
            raise mapped from error
        self.opened = True

    def _loop_deadline(self) -> float:
        loop = asyncio.get_running_loop()
        return loop.time() + (self._deadline - time.monotonic())

    def _fail(self, error: BaseException, *, end: bool = False) -> BaseException:
        """Note the failure for the span; return what to raise (mapped, or ``error`` itself).

        A timeout that the caller's deadline set (not the model timeout) is the caller's
        DEADLINE_EXCEEDED: no fallback model can help, and the caller knows it as its own.
        """
        mapped = model_error(error, self.result.request_model) or error
        if self._by_deadline and getattr(mapped, "reason", "") == "MODEL_TIMEOUT":
            mapped = DeadlineExceeded(
                f"the caller's deadline passed during the call of {self.result.request_model}",
                reason=DEADLINE_EXCEEDED,
                metadata={"model": self.result.request_model},
            )
        self._error = mapped
        if end:
            self._end_span()
        return self._error

    async def deltas(self) -> AsyncIterator[ChunkParts]:
        """What the model writes as it streams (text, tool-call deltas, a refusal, finish
        reasons), one chunk at a time; chunks with nothing of it are not yielded. An
        unstreamed call's whole answer comes as one."""
        if not self._streamed:
            try:
                parts = self._take(self._answer, read_completion)
            except Exception as error:
                raise self._fail(error) from error
            if parts.output:
                yield parts
            self._finished = True
            return
        iterator = self._stream.__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(self._loop_deadline()):
                    chunk = await iterator.__anext__()
                parts = self._take(chunk)
            except StopAsyncIteration:
                break
            except json.JSONDecodeError as error:  # the client parses each event's data
                bad = MalformedChunk(f"an event is not JSON ({error})")
                raise self._fail(bad) from error
            except Exception as error:
                raise self._fail(error) from error
            if parts.output or parts.finish_reasons:
                yield parts
        self._finished = True

    def _take(self, chunk: object, read: Callable[[object], ChunkParts] = read_chunk) -> ChunkParts:
        parts = read(chunk)
        result = self.result
        if parts.model:
            result.model = parts.model
        if parts.usage is not None:
            self._usage_seen = True
            result.input_tokens = parts.usage.input_tokens
            result.output_tokens = parts.usage.output_tokens
            result.cached_input_tokens = parts.usage.cached_input_tokens
        result.finish_reasons.extend(parts.finish_reasons)
        if parts.output:
            if result.time_to_first_token is None and self._started is not None:
                result.time_to_first_token = time.monotonic() - self._started
            result.text += parts.text
            result.other_output += parts.refusal
            for call in parts.tool_calls:
                result.other_output += call.name + call.arguments
        return parts

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            try:
                await self._stream.close()
            except Exception:  # closing a failed stream may fail too; nothing is lost
                pass
        result = self.result
        if not (self._finished and self._usage_seen):
            result.estimated = True
            result.input_tokens = result.input_tokens or self._input_tokens
            written = estimate_tokens(result.text) + estimate_tokens(result.other_output)
            result.output_tokens = max(result.output_tokens, written)
        if self.opened:
            error = self._error if self._error is not None else exc
            reason = None
            if error is not None:
                reason = getattr(error, "reason", None) or "DEADLINE_EXCEEDED"  # cancelled
            await self._judge(result.request_model, self._admission, reason)
        self._end_span()

    def _end_span(self) -> None:
        """End the current attempt's span and observe its metrics."""
        span, self._span = self._span, None
        if span is None:
            return
        result = self.result
        error = self._error
        error_type = ""
        if error is not None:
            error_type = error.reason if isinstance(error, TrellisError) else type(error).__name__
        labels = (OPERATION, PROVIDER, result.request_model, result.model or result.request_model)
        if self._started is not None:
            GEN_AI_OPERATION_DURATION.labels(*labels, error_type).observe(
                time.monotonic() - self._started
            )
        if self.opened:
            GEN_AI_TOKEN_USAGE.labels(*labels, "input").observe(result.input_tokens)
            GEN_AI_TOKEN_USAGE.labels(*labels, "output").observe(result.output_tokens)
            span.set_attribute("gen_ai.response.model", result.model)
            span.set_attribute("gen_ai.usage.input_tokens", result.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", result.output_tokens)
            span.set_attribute("trellis.usage.estimated", result.estimated)
        if result.finish_reasons:
            span.set_attribute("gen_ai.response.finish_reasons", result.finish_reasons)
        if result.time_to_first_token is not None:
            span.set_attribute("gen_ai.response.time_to_first_chunk", result.time_to_first_token)
        if error is not None:
            span.set_attribute("error.type", error_type)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()


class ChatModel:
    """The planner's one ``AsyncOpenAI`` client (one connection pool per process), shared
    by all calls of the service, with the fallback models, rate limits and budget check
    every call goes through (each optional: None/empty skips it; ``budget_policy`` says
    what a check cost accounting cannot answer does).
    ``expected_output_tokens`` is the output a call is estimated at for the budget."""

    def __init__(
        self,
        client: AsyncOpenAI,
        tracer: trace.Tracer,
        *,
        timeout: float,
        fallback_models: Sequence[str] = (),
        rate_limits: RateLimits | None = None,
        budget: BudgetChecker | None = None,
        budget_policy: BudgetPolicy | None = None,
        expected_output_tokens: int = 0,
        breakers: ModelBreakers | None = None,
    ) -> None:
        self.client = client
        self.breakers = breakers
        self.tracer = tracer
        self.timeout = timeout
        self.fallback_models = list(fallback_models)
        self.rate_limits = rate_limits
        self.budget = budget
        self.budget_policy = budget_policy or BudgetPolicy()
        self.expected_output_tokens = expected_output_tokens
        url = urlsplit(str(client.base_url))
        self._server = {"server.address": url.hostname or ""}
        if url.port:
            self._server["server.port"] = url.port  # type: ignore[assignment]

    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        run_id: str = "",
        step: str = "",
        usage_id: str = "",
        options: Mapping[str, Any] | None = None,
        expected_output_tokens: int | None = None,
        span_attributes: Mapping[str, Any] | None = None,
        streamed: bool = True,
    ) -> ChatCall:
        """One call; ``usage_id`` names its ledger row and its budget reservation.

        ``options`` are extra request fields (``tools``, ``response_format``,
        ``temperature``, ``max_completion_tokens``); ``expected_output_tokens`` replaces the
        model's expected output in the budget estimate; ``span_attributes`` go on its spans;
        ``streamed=False`` makes one unstreamed request (for a caller that wants the whole
        answer anyway: one response to parse instead of a chunk per token)."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
            **self._server,
            "trellis.run_id": run_id,
            "trellis.tenant_id": context.tenant(),
            **(span_attributes or {}),
        }
        if step:
            attributes["trellis.planner.step"] = step
        models = [model, *(m for m in self.fallback_models if m != model)]
        return ChatCall(
            self,
            messages,
            models=models,
            attributes=attributes,
            usage_id=usage_id,
            options=options,
            expected_output_tokens=expected_output_tokens,
            streamed=streamed,
        )

    async def aclose(self) -> None:
        await self.client.close()
        if self.rate_limits is not None:
            await self.rate_limits.aclose()
        if self.breakers is not None:
            await self.breakers.aclose()
