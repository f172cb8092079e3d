"""Summarize: fold the oldest turns of a session's context into its summary. No gRPC.

The executor asks when a turn's context (``trellis.contract.session_context``) is over
its budget; the context is counted again here, the same way, and when it fits nothing is
called. Otherwise the previous summary and the oldest turns (enough that the turns kept
take at most half the budget) go to the model in one call, which is a model call like
any other of the planner: budget check, rate limits, fallback models, a GenAI span, its
usage recorded in the ledger under ``{run}/summarize/0`` (the session's id travels with
the request). The summary is cut to a quarter of the budget whatever the model wrote, so
a summary and the turns kept always fit.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass

from trellis.contract.session_context import fold_count
from trellis.planner.v1 import planner_pb2
from trellis.runtime.tokens import CHARS_PER_TOKEN
from trellis.runtime.validation import MODEL_NAME, RUN_ID, Problems
from trellis_planner import model_usage
from trellis_planner.model import ChatCall, ChatModel
from trellis_planner.model_errors import refused
from trellis_planner.model_usage import CallUsage, UsageSender
from trellis_planner.prompts import summary_messages

STEP = "summarize"
#: Share of the context budget a summary may take (tokens); about 1.3 tokens a word.
SUMMARY_SHARE = 4


@dataclass(frozen=True)
class Folded:
    """The new summary and the last turn it covers; None usage when nothing was folded."""

    folded: bool
    summary: str = ""
    through_turn: int = 0
    usage: CallUsage | None = None


def check(request: planner_pb2.SummarizeRequest) -> None:
    problems = Problems()
    problems.check_id("run_id", request.run_id, RUN_ID, required=True)
    problems.check_id("model", request.model, MODEL_NAME)
    if request.max_tokens <= 0:
        problems.add("INVALID_MODEL_REQUEST", "max_tokens", "must be > 0")
    problems.refuse("summarize request")


class Summarizer:
    def __init__(self, model: ChatModel, usage: UsageSender, *, default_model: str) -> None:
        self._model = model
        self._usage = usage
        self._default_model = default_model

    async def summarize(self, request: planner_pb2.SummarizeRequest) -> Folded:
        check(request)
        session = request.session
        fold = fold_count(session, request.max_tokens)
        if fold == 0:
            return Folded(False)
        summary_tokens = max(16, request.max_tokens // SUMMARY_SHARE)
        call = self._model.chat(
            summary_messages(session, fold, max_words=max(10, summary_tokens * 3 // 4)),
            model=request.model or self._default_model,
            run_id=request.run_id,
            step=STEP,
            usage_id=model_usage.usage_id(request.run_id, STEP, 0, request.attempt),
            options={"max_completion_tokens": summary_tokens},
            expected_output_tokens=summary_tokens,
            span_attributes={"session.id": session.session_id},
        )
        await call.reserve()
        text: list[str] = []
        refusal: list[str] = []
        try:
            async with call, aclosing(call.deltas()) as deltas:
                async for parts in deltas:
                    if parts.refusal:
                        refusal.append(parts.refusal)
                    if parts.text:
                        text.append(parts.text)
            if refusal:
                raise refused(call.result.model, "".join(refusal))
        except BaseException:  # cancelled or failed: the tokens were spent all the same
            await self._record(call, request)
            raise
        used = await self._record(call, request)
        summary = "".join(text).strip()[: summary_tokens * CHARS_PER_TOKEN]
        return Folded(True, summary, session.turns[fold - 1].number, used)

    async def _record(self, call: ChatCall, request: planner_pb2.SummarizeRequest) -> CallUsage:
        return await model_usage.record_call(self._usage, call, request.run_id)
