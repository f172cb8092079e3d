"""PlannerService over gRPC: protos in, ``Planner`` calls, protos out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from trellis.planner.v1 import planner_pb2, planner_pb2_grpc
from trellis_planner.core import CallStarted, CallUsage, JoinEnd, PlanEnd, Planner


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, planner: Planner) -> None:
        self._planner = planner

    async def Plan(
        self, request: planner_pb2.PlanRequest, context: aio.ServicerContext
    ) -> AsyncIterator[planner_pb2.PlanResponse]:
        async for item in self._planner.plan(request):
            if isinstance(item, PlanEnd):
                yield planner_pb2.PlanResponse(done=planner_pb2.PlanDone(usage=item.usage))
            elif isinstance(item, CallStarted | CallUsage):
                yield planner_pb2.PlanResponse(usage=_call_usage(item))
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
            else:
                yield planner_pb2.JoinResponse(answer_delta=item)


def _call_usage(item: CallStarted | CallUsage) -> planner_pb2.ModelCallUsage:
    if isinstance(item, CallStarted):
        return planner_pb2.ModelCallUsage(usage_id=item.usage_id, started=True)
    return planner_pb2.ModelCallUsage(
        usage_id=item.usage_id, usage=item.usage, cost_deferred=item.deferred
    )
