"""One embeddings call: the ``openai`` client's embeddings API under the planner's
model access, like a chat call (``model.py``) without the stream.

Before anything is sent the tenant's budget is checked with the call's estimated input
tokens (an embedding has no output), holding the estimate under the call's ``usage_id``;
then the call takes its place under the model's rate limits and sends one request with
every input (the API takes up to 2,048). The call is an ``embeddings {model}`` CLIENT
span with the GenAI attributes, observed in ``gen_ai_client_operation_duration_seconds``
and ``gen_ai_client_token_usage``, bounded by the model timeout and the request's
deadline, and its failures are the chat calls' errors (``model_errors``): an answer
without one vector of numbers per input is MODEL_BAD_RESPONSE. There is no fallback
model: fallback models are chat models, and vectors of another model do not compare.

Usage is the response's ``prompt_tokens``; without it the input is estimated and the
usage marked so.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from trellis.runtime import context
from trellis.runtime.errors import DeadlineExceeded, TrellisError, Unavailable
from trellis.runtime.metrics import GEN_AI_OPERATION_DURATION, GEN_AI_TOKEN_USAGE
from trellis.runtime.tokens import estimate_tokens
from trellis_planner.budget import require_budget
from trellis_planner.model import DEADLINE_EXCEEDED, PROVIDER, ChatModel
from trellis_planner.model_errors import model_error

OPERATION = "embeddings"
#: The most inputs one embeddings request may carry (OpenAI's limit).
MAX_INPUTS = 2048


@dataclass
class EmbeddingResult:
    """What one call produced."""

    model: str
    vectors: list[list[float]] = field(default_factory=list)
    #: 0 unless the endpoint answered (as a chat call that never opened a stream).
    input_tokens: int = 0
    #: True when the answer had no usage and the tokens were estimated.
    estimated: bool = False
    #: Whether the endpoint answered.
    answered: bool = False


class EmbeddingCall:
    """``await call.reserve()`` (BUDGET_EXCEEDED: no call), then ``await call.run()``."""

    def __init__(
        self,
        model: ChatModel,
        inputs: Sequence[str],
        *,
        name: str,
        usage_id: str,
        dimensions: int = 0,
        span_attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self._model = model
        self._inputs = list(inputs)
        self._dimensions = dimensions
        self.usage_id = usage_id
        self._input_tokens = sum(estimate_tokens(text) for text in self._inputs)
        self.result = EmbeddingResult(model=name)
        self._attributes = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": name,
            "trellis.tenant_id": context.tenant(),
            **(span_attributes or {}),
        }
        if dimensions:
            self._attributes["gen_ai.embeddings.dimension.count"] = dimensions

    async def reserve(self) -> None:
        model = self._model
        if model.budget is not None:
            await require_budget(
                model.budget,
                model.budget_policy,
                self.result.model,
                input_tokens=self._input_tokens,
                output_tokens=0,
                reservation_id=self.usage_id,
            )

    async def run(self) -> EmbeddingResult:
        """The vectors; raises the mapped Trellis error (the result keeps what was used)."""
        model, result = self._model, self.result
        name = result.model
        span = model.tracer.start_span(
            f"{OPERATION} {name}", kind=SpanKind.CLIENT, attributes=self._attributes
        )
        started: float | None = None
        error: BaseException | None = None
        by_deadline = False
        try:
            if model.rate_limits is not None:
                left = context.remaining()
                waited = await model.rate_limits.admit(
                    name, self._input_tokens, max_wait=model.timeout if left is None else left
                )
                if waited:
                    span.set_attribute("trellis.rate_limit.wait_s", waited)
            budget = model.timeout
            left = context.remaining()
            if left is not None and left < budget:
                budget, by_deadline = left, True
            if budget <= 0:
                raise DeadlineExceeded(
                    "no time left for the embeddings call",
                    reason=DEADLINE_EXCEEDED,
                    metadata={"model": name},
                )
            started = time.monotonic()
            extra: dict[str, Any] = {"dimensions": self._dimensions} if self._dimensions else {}
            async with asyncio.timeout(budget):
                response = await model.client.embeddings.create(
                    model=name,
                    input=self._inputs,
                    encoding_format="float",
                    timeout=budget,
                    **extra,
                )
            result.answered = True
            self._take(response)
        except BaseException as raised:
            error = self._mapped(raised, name, by_deadline)
            if error is raised:
                raise
            raise error from raised
        finally:
            self._end(span, started, error)
        return result

    def _take(self, response: Any) -> None:
        result = self.result
        result.model = str(getattr(response, "model", "") or result.model)
        usage = getattr(response, "usage", None)
        tokens = getattr(usage, "prompt_tokens", None)
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            result.input_tokens = tokens
        else:
            result.input_tokens, result.estimated = self._input_tokens, True
        data = sorted(getattr(response, "data", None) or [], key=lambda d: d.index)
        vectors = [list(getattr(item, "embedding", None) or []) for item in data]
        if len(vectors) != len(self._inputs) or not all(map(_is_vector, vectors)):
            raise Unavailable(
                f"model {result.model} answered {len(vectors)} vectors for "
                f"{len(self._inputs)} inputs, or a vector that is not numbers",
                reason="MODEL_BAD_RESPONSE",
                metadata={"model": result.model},
            )
        result.vectors = vectors

    def _mapped(self, error: BaseException, name: str, by_deadline: bool) -> BaseException:
        mapped = model_error(error, name) or error
        if by_deadline and getattr(mapped, "reason", "") == "MODEL_TIMEOUT":
            mapped = DeadlineExceeded(
                f"the caller's deadline passed during the embeddings call of {name}",
                reason=DEADLINE_EXCEEDED,
                metadata={"model": name},
            )
        return mapped

    def _end(self, span: Any, started: float | None, error: BaseException | None) -> None:
        result = self.result
        error_type = ""
        if error is not None:
            error_type = error.reason if isinstance(error, TrellisError) else type(error).__name__
        labels = (OPERATION, PROVIDER, self._attributes["gen_ai.request.model"], result.model)
        if started is not None:
            GEN_AI_OPERATION_DURATION.labels(*labels, error_type).observe(
                time.monotonic() - started
            )
        if result.answered:
            GEN_AI_TOKEN_USAGE.labels(*labels, "input").observe(result.input_tokens)
            span.set_attribute("gen_ai.response.model", result.model)
            span.set_attribute("gen_ai.usage.input_tokens", result.input_tokens)
            span.set_attribute("trellis.usage.estimated", result.estimated)
        if error is not None:
            span.set_attribute("error.type", error_type)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()


def _is_vector(values: list[Any]) -> bool:
    return bool(values) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
