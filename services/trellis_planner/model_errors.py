"""The ``openai`` client's failures as Trellis errors, and token estimates.

One place decides which model failures are retryable (and so may fall back to the
next model) and what a caller sees: MODEL_TIMEOUT, MODEL_RATE_LIMITED (with the
endpoint's Retry-After as RetryInfo), MODEL_UNAVAILABLE, MODEL_AUTH_FAILED,
MODEL_REJECTED, MODEL_BAD_RESPONSE; and MODEL_REFUSED for a model that declined
(``refused``).

MODEL_BAD_RESPONSE (a stream event that is not JSON, or not a chunk: ``chunks.py``) is the
provider's fault, like a connection cut mid-stream, so it is UNAVAILABLE (the caller may
try again). It only happens once a stream is open, when no fallback model is tried any
more (``model.py``), so it is not among the fallback reasons.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import openai

from trellis.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    TrellisError,
    Unavailable,
)
from trellis.runtime.tokens import estimate_tokens
from trellis_planner.chunks import MalformedChunk


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def estimate_input_tokens(
    messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any] | None = None
) -> int:
    """The messages' text (content, tool calls) and the request's tool definitions or
    response schema (``options``), at about four characters a token."""
    total = 0
    for message in messages:
        total += estimate_tokens(_text(message.get("content") or ""))
        if calls := message.get("tool_calls"):
            total += estimate_tokens(_text(calls))
    for key in ("tools", "response_format"):
        if options and options.get(key):
            total += estimate_tokens(_text(options[key]))
    return total


def refused(model: str, text: str) -> FailedPrecondition:
    """The model declined the request (the API's ``refusal``): not retryable, its words
    quoted (bounded) so the caller knows why."""
    words = " ".join(text.split())
    if len(words) > 300:
        words = words[:299] + "…"
    return FailedPrecondition(
        f"model {model} refused: {words}", reason="MODEL_REFUSED", metadata={"model": model}
    )


def retry_after(error: openai.APIStatusError) -> float | None:
    """The endpoint's Retry-After (``retry-after-ms`` or ``retry-after`` seconds), if any."""
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value) / scale
        except ValueError:
            continue
        if math.isfinite(delay) and delay >= 0:
            return delay
    return None


def model_error(error: BaseException, model: str) -> TrellisError | None:
    """The Trellis error for an exception of the openai client (or of the deadline).

    None for anything else: a bug is not a model failure and must surface as itself.
    """
    meta = {"model": model}
    if isinstance(error, TrellisError):
        return error
    if isinstance(error, MalformedChunk):
        return Unavailable(
            f"model {model} sent a malformed stream: {error}",
            reason="MODEL_BAD_RESPONSE",
            metadata=meta,
        )
    if isinstance(error, openai.APITimeoutError | TimeoutError):
        return DeadlineExceeded(f"model {model} timed out", reason="MODEL_TIMEOUT", metadata=meta)
    if isinstance(error, openai.RateLimitError):
        return ResourceExhausted(
            f"model {model} is rate limited",
            reason="MODEL_RATE_LIMITED",
            metadata=meta,
            retry_delay=retry_after(error),
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
