"""One model call: streamed through the ``openai`` client, traced, bounded, mapped.

Every call is a ``chat {model}`` CLIENT span with the GenAI semantic-convention
attributes (and time to first token), is bounded by the service's model timeout and by
the incoming request's deadline, and turns the client's exceptions into Trellis errors
with stable reasons (MODEL_TIMEOUT, MODEL_RATE_LIMITED, MODEL_UNAVAILABLE, ...). Usage
comes from the stream's final usage chunk; when the endpoint sends none, or the call
stops early, it is estimated and marked so.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import openai
from openai import AsyncOpenAI
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from trellis.runtime import context
from trellis.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    TrellisError,
    Unavailable,
)

PROVIDER = "openai"


def estimate_tokens(text: str) -> int:
    """About four characters per token: the usual rule of thumb for BPE vocabularies."""
    return math.ceil(len(text) / 4)


def model_error(error: BaseException, model: str) -> TrellisError | None:
    """The Trellis error for an exception of the openai client (or of the deadline).

    None for anything else: a bug is not a model failure and must surface as itself.
    """
    meta = {"model": model}
    if isinstance(error, TrellisError):
        return error
    if isinstance(error, openai.APITimeoutError | TimeoutError):
        return DeadlineExceeded(f"model {model} timed out", reason="MODEL_TIMEOUT", metadata=meta)
    if isinstance(error, openai.RateLimitError):
        return ResourceExhausted(
            f"model {model} is rate limited", reason="MODEL_RATE_LIMITED", metadata=meta
        )
    if isinstance(error, openai.APIConnectionError):
        return Unavailable(
            f"model endpoint unreachable: {error}", reason="MODEL_UNAVAILABLE", metadata=meta
        )
    if isinstance(error, openai.APIStatusError):
        status = {**meta, "http_status": str(error.status_code)}
        if error.status_code >= 500:
            return Unavailable(
                f"model {model} failed with HTTP {error.status_code}",
                reason="MODEL_UNAVAILABLE",
                metadata=status,
            )
        reason = "MODEL_AUTH_FAILED" if error.status_code in (401, 403) else "MODEL_REJECTED"
        return FailedPrecondition(
            f"model {model} rejected the request (HTTP {error.status_code}): {error.message}",
            reason=reason,
            metadata=status,
        )
    if isinstance(error, openai.OpenAIError):
        return Unavailable(
            f"model {model} failed: {error}", reason="MODEL_UNAVAILABLE", metadata=meta
        )
    return None


@dataclass
class ChatResult:
    """What one call produced; complete once its ``async with`` block has exited."""

    request_model: str
    model: str = ""
    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    #: True when the tokens were estimated (no usage chunk, or the stream stopped early).
    estimated: bool = False
    time_to_first_token: float | None = None
    finish_reasons: list[str] = field(default_factory=list)


class ChatCall:
    """``async with model.chat(...) as call: async for text in call.deltas(): ...``"""

    def __init__(
        self,
        model: ChatModel,
        messages: Sequence[dict[str, str]],
        *,
        request_model: str,
        attributes: dict[str, Any],
    ) -> None:
        self._model = model
        self._messages = list(messages)
        self._attributes = attributes
        self.result = ChatResult(request_model=request_model, model=request_model)
        #: Whether the endpoint answered (tokens may have been spent).
        self.opened = False
        self._stream: Any = None
        self._span: trace.Span | None = None
        self._deadline = 0.0
        self._started = 0.0
        self._usage_seen = False
        self._finished = False
        self._error: Exception | None = None

    async def __aenter__(self) -> ChatCall:
        name = self.result.request_model
        self._span = self._model.tracer.start_span(
            f"chat {name}", kind=SpanKind.CLIENT, attributes=self._attributes
        )
        self._started = time.monotonic()
        budget = self._model.timeout
        left = context.remaining()
        if left is not None:
            budget = min(budget, left)
        self._deadline = self._started + budget
        try:
            if budget <= 0:
                raise DeadlineExceeded(
                    "no time left for the model call",
                    reason="MODEL_TIMEOUT",
                    metadata={"model": name},
                )
            async with asyncio.timeout_at(self._loop_deadline()):
                self._stream = await self._model.client.chat.completions.create(
                    model=name,
                    messages=self._messages,  # type: ignore[arg-type]
                    stream=True,
                    stream_options={"include_usage": True},
                    timeout=budget,
                )
        except Exception as error:
            raise self._fail(error, end=True) from error
        self.opened = True
        return self

    def _loop_deadline(self) -> float:
        loop = asyncio.get_running_loop()
        return loop.time() + (self._deadline - time.monotonic())

    def _fail(self, error: Exception, *, end: bool = False) -> Exception:
        """Note the failure for the span; return what to raise (mapped, or ``error`` itself)."""
        self._error = model_error(error, self.result.request_model) or error
        if end:
            self._end_span()
        return self._error

    async def deltas(self) -> AsyncIterator[str]:
        """The output text as it streams, in the pieces the endpoint sends."""
        iterator = self._stream.__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(self._loop_deadline()):
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except Exception as error:
                raise self._fail(error) from error
            text = self._take(chunk)
            if text:
                yield text
        self._finished = True

    def _take(self, chunk: Any) -> str:
        result = self.result
        if getattr(chunk, "model", None):
            result.model = chunk.model
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self._usage_seen = True
            result.input_tokens = usage.prompt_tokens or 0
            result.output_tokens = usage.completion_tokens or 0
            details = getattr(usage, "prompt_tokens_details", None)
            result.cached_input_tokens = getattr(details, "cached_tokens", 0) or 0
        text = ""
        for choice in chunk.choices or ():
            if choice.delta and choice.delta.content:
                text += choice.delta.content
            if choice.finish_reason:
                result.finish_reasons.append(choice.finish_reason)
        if text:
            if result.time_to_first_token is None:
                result.time_to_first_token = time.monotonic() - self._started
            result.text += text
        return text

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
            result.input_tokens = result.input_tokens or sum(
                estimate_tokens(m.get("content", "")) for m in self._messages
            )
            result.output_tokens = max(result.output_tokens, estimate_tokens(result.text))
        self._end_span()

    def _end_span(self) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        result = self.result
        span.set_attribute("gen_ai.response.model", result.model)
        span.set_attribute("gen_ai.usage.input_tokens", result.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", result.output_tokens)
        span.set_attribute("trellis.usage.estimated", result.estimated)
        if result.finish_reasons:
            span.set_attribute("gen_ai.response.finish_reasons", result.finish_reasons)
        if result.time_to_first_token is not None:
            span.set_attribute("trellis.time_to_first_token_s", result.time_to_first_token)
        error = self._error
        if error is not None:
            reason = error.reason if isinstance(error, TrellisError) else type(error).__name__
            span.set_attribute("error.type", reason)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()


class ChatModel:
    """The planner's one ``AsyncOpenAI`` client, shared by all calls of the service."""

    def __init__(self, client: AsyncOpenAI, tracer: trace.Tracer, *, timeout: float) -> None:
        self.client = client
        self.tracer = tracer
        self.timeout = timeout
        url = urlsplit(str(client.base_url))
        self._server = {"server.address": url.hostname or ""}
        if url.port:
            self._server["server.port"] = url.port  # type: ignore[assignment]

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        model: str,
        run_id: str = "",
        step: str = "",
    ) -> ChatCall:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
            **self._server,
            "trellis.run_id": run_id,
        }
        if step:
            attributes["trellis.planner.step"] = step
        return ChatCall(self, messages, request_model=model, attributes=attributes)

    async def aclose(self) -> None:
        await self.client.close()
