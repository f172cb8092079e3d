"""Client of ``trellis.planner.v1.PlannerService``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from trellis.clients._streams import stream
from trellis.planner.v1 import planner_pb2, planner_pb2_grpc


class PlannerClient:
    def __init__(self, channel: aio.Channel, *, timeout: float = 120.0) -> None:
        self._stub = planner_pb2_grpc.PlannerServiceStub(channel)
        self._timeout = timeout

    def plan(self, request: planner_pb2.PlanRequest) -> AsyncIterator[planner_pb2.PlanResponse]:
        """One ToolCall per message as the model emits it, then ``done``."""
        return stream(self._stub.Plan(request, timeout=self._timeout))

    def join(self, request: planner_pb2.JoinRequest) -> AsyncIterator[planner_pb2.JoinResponse]:
        """Answer tokens, then ``done`` with FINISH or REPLAN."""
        return stream(self._stub.Join(request, timeout=self._timeout))
