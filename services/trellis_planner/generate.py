"""Model calls made for others: ``Generate`` (a model tool's chat call) and ``Embed``.

The gateway's model and embed tools reach a model only through here, so they get what
every model call of the planner has: the budget check holding the call's estimate, the
model's rate limits, fallback models (chat only), GenAI spans and metrics, and usage
recorded in the ledger through the durable outbox. No gRPC here.

One call may serve several nodes (the gateway batches concurrent calls of a tool): the
request names one ``UsageShare`` per node; the call's tokens are split between them
exactly (``trellis.runtime.shares``: largest remainder by weight; uncached input, cached
input and output each on their own, so no share has more cached than input tokens) and
each share is one ledger row under its own usage id. The rows sum to what the call
used, token for token; priced by the ledger, their costs sum to the call's cost whenever
the model's prices are whole nano-USD per token (every bundled price is). The first
share's usage id is the call's budget reservation, settled by its row.

Errors: a caller's mistake (ids, messages, schema: INVALID_ARGUMENT) and a call the
budget refuses (BUDGET_EXCEEDED) are raised before any model is called. Once the budget
check passed, the call is recorded however it ends (zero tokens when the endpoint never
answered, also when the caller goes away: the write outlives it) and a failure comes back
as ``error`` beside that usage, since the caller must learn what a failed call cost.

``timeout`` bounds the model call inside the request's own deadline, so the answer and
its usage go back before a caller that waits a little longer than ``timeout`` gives up.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator, SchemaError

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, seconds
from trellis.runtime.errors import TrellisError
from trellis.runtime.redact import redact_text
from trellis.runtime.shares import split
from trellis.runtime.validation import MODEL_NAME, NODE_ID, RUN_ID, TOOL_NAME, USAGE_ID, Problems
from trellis_planner import model_usage
from trellis_planner.embedding import MAX_INPUTS, EmbeddingCall
from trellis_planner.model import ChatModel
from trellis_planner.model_usage import CallUsage, UsageSender

STEP = "generate"
ROLES = frozenset({"system", "user", "assistant"})
#: Largest prompt (all messages, UTF-8 bytes) or embeddings input one call may carry.
MAX_PROMPT_BYTES = 1024 * 1024
#: Most shares (nodes) one call may serve.
MAX_SHARES = MAX_INPUTS
INVALID_REQUEST = "INVALID_MODEL_REQUEST"


@dataclass(frozen=True)
class Share:
    """One node a call is for, with its usage id decided."""

    run_id: str
    node_id: str
    usage_id: str
    weight: int


@dataclass(frozen=True)
class Generated:
    """What a Generate call produced: text, or the error it ended with, and its usage."""

    text: str
    usage: list[CallUsage]
    error: common_pb2.Error | None = None


@dataclass(frozen=True)
class Embedded:
    """What an Embed call produced."""

    vectors: list[list[float]]
    usage: list[CallUsage]
    error: common_pb2.Error | None = None


def _shares(raw: Sequence[planner_pb2.UsageShare], problems: Problems) -> list[Share]:
    if not raw:
        problems.add(INVALID_REQUEST, "shares", "at least one share (whom the call is for)")
    if len(raw) > MAX_SHARES:
        problems.add(INVALID_REQUEST, "shares", f"at most {MAX_SHARES}")
    shares, seen = [], set()
    for index, share in enumerate(raw[:MAX_SHARES]):
        where = f"shares[{index}]"
        problems.check_id(f"{where}.run_id", share.run_id, RUN_ID)
        problems.check_id(f"{where}.node_id", share.node_id, NODE_ID)
        problems.check_id(f"{where}.usage_id", share.usage_id, USAGE_ID)
        usage_id = share.usage_id
        if share.run_id:
            prefix = f"{share.run_id}/{share.node_id}/model"
            if not (usage_id == prefix or usage_id.startswith(prefix + "/")):
                problems.add(INVALID_REQUEST, f"{where}.usage_id", f"must start with {prefix}")
        elif not usage_id:
            usage_id = str(uuid.uuid4())
        if usage_id in seen:
            problems.add(INVALID_REQUEST, f"{where}.usage_id", "used by another share")
        seen.add(usage_id)
        if share.weight < 0:
            problems.add(INVALID_REQUEST, f"{where}.weight", "must not be negative")
        shares.append(Share(share.run_id, share.node_id, usage_id, share.weight))
    return shares


def _common(problems: Problems, model: str, tool: str, timeout: float) -> None:
    problems.check_id("model", model, MODEL_NAME)
    problems.check_id("tool", tool, TOOL_NAME)
    if timeout < 0:
        problems.add(INVALID_REQUEST, "timeout", "must not be negative")


def check_generate(request: planner_pb2.GenerateRequest) -> list[Share]:
    """The request's shares; INVALID_ARGUMENT naming every field it breaks."""
    problems = Problems()
    shares = _shares(request.shares, problems)
    _common(problems, request.model, request.tool, seconds(request.timeout))
    if not request.messages:
        problems.add(INVALID_REQUEST, "messages", "at least one message")
    size = 0
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            problems.add(INVALID_REQUEST, f"messages[{index}].role", "system, user or assistant")
        size += len(message.content.encode())
    if size > MAX_PROMPT_BYTES:
        problems.add(INVALID_REQUEST, "messages", f"more than {MAX_PROMPT_BYTES} bytes")
    if request.HasField("output_schema"):
        schema = json.dumps(from_struct(request.output_schema), sort_keys=True)
        if (problem := _schema_problem(schema)) is not None:
            problems.add(INVALID_REQUEST, "output_schema", f"not a JSON Schema: {problem}")
        problems.check_id("output_name", request.output_name, TOOL_NAME)
    if request.max_output_tokens < 0:
        problems.add(INVALID_REQUEST, "max_output_tokens", "must not be negative")
    if request.HasField("temperature") and not 0 <= request.temperature <= 2:
        problems.add(INVALID_REQUEST, "temperature", "must be between 0 and 2")
    problems.refuse("generate request")
    return shares


@functools.lru_cache(maxsize=256)
def _schema_problem(schema: str) -> str | None:
    """Why the JSON Schema ``schema`` (canonical JSON) is not one; checked once per schema:
    a model tool sends the same few schemas again and again."""
    try:
        Draft202012Validator.check_schema(json.loads(schema))
    except SchemaError as error:
        return error.message
    return None


def check_embed(request: planner_pb2.EmbedRequest) -> list[Share]:
    problems = Problems()
    shares = _shares(request.shares, problems)
    _common(problems, request.model, request.tool, seconds(request.timeout))
    if not request.inputs or len(request.inputs) > MAX_INPUTS:
        problems.add(INVALID_REQUEST, "inputs", f"1 to {MAX_INPUTS} texts")
    if sum(len(text.encode()) for text in request.inputs) > MAX_PROMPT_BYTES:
        problems.add(INVALID_REQUEST, "inputs", f"more than {MAX_PROMPT_BYTES} bytes")
    if request.dimensions < 0:
        problems.add(INVALID_REQUEST, "dimensions", "must not be negative")
    problems.refuse("embed request")
    return shares


def split_usage(usage: common_pb2.Usage, weights: Sequence[int]) -> list[common_pb2.Usage]:
    """``usage`` divided between shares of ``weights``; every count sums exactly."""
    uncached = split(usage.input_tokens - usage.cached_input_tokens, weights)
    cached = split(usage.cached_input_tokens, weights)
    output = split(usage.output_tokens, weights)
    return [
        common_pb2.Usage(
            model=usage.model,
            input_tokens=uncached[i] + cached[i],
            output_tokens=output[i],
            cached_input_tokens=cached[i],
            estimated=usage.estimated,
        )
        for i in range(len(weights))
    ]


def _error(error: TrellisError) -> common_pb2.Error:
    return common_pb2.Error(
        code=error.reason, message=redact_text(error.message), retryable=error.retryable
    )


def _timeout(duration: Any) -> float | None:
    value = seconds(duration)
    return value if value > 0 else None


class Generator:
    """Generate and Embed over the planner's model access and usage outbox."""

    def __init__(
        self,
        model: ChatModel,
        usage: UsageSender,
        *,
        default_model: str,
        embedding_model: str,
    ) -> None:
        self._model = model
        self._usage = usage
        self._default_model = default_model
        self._embedding_model = embedding_model

    async def generate(self, request: planner_pb2.GenerateRequest) -> Generated:
        shares = check_generate(request)
        options: dict[str, Any] = {}
        attributes: dict[str, Any] = {"trellis.batch.size": len(shares)}
        if request.tool:
            attributes["trellis.tool"] = request.tool
        if shares[0].node_id:
            attributes["trellis.node_id"] = shares[0].node_id
        if request.HasField("output_schema"):
            options["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": request.output_name or "output",
                    "schema": from_struct(request.output_schema),
                    "strict": True,
                },
            }
            attributes["gen_ai.output.type"] = "json"
        if request.max_output_tokens:
            options["max_completion_tokens"] = request.max_output_tokens
            attributes["gen_ai.request.max_tokens"] = request.max_output_tokens
        if request.HasField("temperature"):
            options["temperature"] = request.temperature
            attributes["gen_ai.request.temperature"] = request.temperature
        call = self._model.chat(
            [{"role": m.role, "content": m.content} for m in request.messages],
            model=request.model or self._default_model,
            run_id=shares[0].run_id,
            step=STEP,
            usage_id=shares[0].usage_id,
            options=options,
            expected_output_tokens=request.max_output_tokens or None,
            span_attributes=attributes,
            streamed=False,  # the caller wants the whole answer: one response, not a chunk a token
        )
        with context.request_scope(timeout=_timeout(request.timeout)):
            await call.reserve()  # BUDGET_EXCEEDED: no call, nothing to record
            error: common_pb2.Error | None = None
            try:
                async with call, aclosing(call.deltas()) as deltas:
                    async for _ in deltas:
                        pass
            except TrellisError as failure:
                error = _error(failure)
            except BaseException:  # cancelled (or a bug): the tokens were spent all the same
                await self._record(call.usage(), shares)
                raise
        usage = await self._record(call.usage(), shares)
        return Generated(call.result.text if error is None else "", usage, error)

    async def embed(self, request: planner_pb2.EmbedRequest) -> Embedded:
        shares = check_embed(request)
        attributes: dict[str, Any] = {"trellis.batch.size": len(shares)}
        if request.tool:
            attributes["trellis.tool"] = request.tool
        if shares[0].run_id:
            attributes["trellis.run_id"] = shares[0].run_id
        call = EmbeddingCall(
            self._model,
            list(request.inputs),
            name=request.model or self._embedding_model,
            usage_id=shares[0].usage_id,
            dimensions=request.dimensions,
            span_attributes=attributes,
        )
        with context.request_scope(timeout=_timeout(request.timeout)):
            await call.reserve()
            error: common_pb2.Error | None = None
            try:
                await call.run()
            except TrellisError as failure:
                error = _error(failure)
            except BaseException:
                await self._record(embed_usage(call), shares)
                raise
        usage = await self._record(embed_usage(call), shares)
        vectors = call.result.vectors if error is None else []
        return Embedded(vectors, usage, error)

    async def _record(self, usage: common_pb2.Usage, shares: Sequence[Share]) -> list[CallUsage]:
        """One ledger row per share, concurrently; each share's usage with its cost."""
        parts = split_usage(usage, [share.weight for share in shares])

        async def one(share: Share, part: common_pb2.Usage) -> CallUsage:
            cost = await model_usage.record(
                self._usage,
                usage_id=share.usage_id,
                run_id=share.run_id,
                node_id=share.node_id,
                usage=part,
                estimated=part.estimated,
            )
            part.cost_nano_usd = cost or 0
            return CallUsage(share.usage_id, part, deferred=cost is None)

        return list(await asyncio.gather(*(one(s, p) for s, p in zip(shares, parts, strict=True))))


def embed_usage(call: EmbeddingCall) -> common_pb2.Usage:
    result = call.result
    return common_pb2.Usage(
        model=result.model, input_tokens=result.input_tokens, estimated=result.estimated
    )
