"""PlannerService over gRPC: protos in, ``Planner`` and ``Generator`` calls, protos out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2, planner_pb2_grpc
from trellis_planner.core import CallStarted, CallUsage, JoinEnd, PlanEnd, Planner, PlanStarted
from trellis_planner.generate import Generator
from trellis_planner.summarize import Summarizer


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, planner: Planner, generator: Generator, summarizer: Summarizer) -> None:
        self._planner = planner
        self._generator = generator
        self._summarizer = summarizer

    async def Plan(
        self, request: planner_pb2.PlanRequest, context: aio.ServicerContext
    ) -> AsyncIterator[planner_pb2.PlanResponse]:
        async for item in self._planner.plan(request):
            if isinstance(item, PlanEnd):
                done = planner_pb2.PlanDone(usage=item.usage, answered=item.answered)
                yield planner_pb2.PlanResponse(done=done)
            elif isinstance(item, PlanStarted):
                started = planner_pb2.PlanStarted(plan_format=item.plan_format.proto)
                yield planner_pb2.PlanResponse(started=started)
            elif isinstance(item, CallStarted | CallUsage):
                yield planner_pb2.PlanResponse(usage=_call_usage(item))
            elif isinstance(item, str):
                yield planner_pb2.PlanResponse(answer_delta=item)
            else:
                yield planner_pb2.PlanResponse(node=item)

    async def Join(
        self, request: planner_pb2.JoinRequest, context: aio.ServicerContext
    ) -> AsyncIterator[planner_pb2.JoinResponse]:
        async for item in self._planner.join(request):
            if isinstance(item, JoinEnd):
                decision = (
                    planner_pb2.JOIN_DECISION_REPLAN
                    if item.replan
                    else planner_pb2.JOIN_DECISION_FINISH
                )
                done = planner_pb2.JoinDone(decision=decision, reason=item.reason, usage=item.usage)
                yield planner_pb2.JoinResponse(done=done)
            elif isinstance(item, CallStarted | CallUsage):
                yield planner_pb2.JoinResponse(usage=_call_usage(item))
            elif isinstance(item, common_pb2.ToolCall):
                yield planner_pb2.JoinResponse(node=item)
            else:
                yield planner_pb2.JoinResponse(answer_delta=item)

    async def Generate(
        self, request: planner_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> planner_pb2.GenerateResponse:
        generated = await self._generator.generate(request)
        return planner_pb2.GenerateResponse(
            text=generated.text,
            usage=[_call_usage(u) for u in generated.usage],
            error=generated.error,
        )

    async def Embed(
        self, request: planner_pb2.EmbedRequest, context: aio.ServicerContext
    ) -> planner_pb2.EmbedResponse:
        embedded = await self._generator.embed(request)
        return planner_pb2.EmbedResponse(
            embeddings=[planner_pb2.Embedding(values=v) for v in embedded.vectors],
            usage=[_call_usage(u) for u in embedded.usage],
            error=embedded.error,
        )

    async def Summarize(
        self, request: planner_pb2.SummarizeRequest, context: aio.ServicerContext
    ) -> planner_pb2.SummarizeResponse:
        folded = await self._summarizer.summarize(request)
        response = planner_pb2.SummarizeResponse(
            folded=folded.folded, summary=folded.summary, through_turn=folded.through_turn
        )
        if folded.usage is not None:
            response.usage.CopyFrom(_call_usage(folded.usage))
        return response


def _call_usage(item: CallStarted | CallUsage) -> planner_pb2.ModelCallUsage:
    if isinstance(item, CallStarted):
        return planner_pb2.ModelCallUsage(usage_id=item.usage_id, started=True)
    return planner_pb2.ModelCallUsage(
        usage_id=item.usage_id, usage=item.usage, cost_deferred=item.deferred
    )
