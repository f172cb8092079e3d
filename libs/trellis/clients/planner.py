"""Client of ``trellis.planner.v1.PlannerService``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from trellis.clients._streams import stream
from trellis.planner.v1 import planner_pb2, planner_pb2_grpc
from trellis.runtime.errors import translated_rpc_errors


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

    async def generate(
        self, request: planner_pb2.GenerateRequest, *, within: float | None = None
    ) -> planner_pb2.GenerateResponse:
        """One model call (the RPC bounded by ``within`` seconds, else the client default);
        a failure after the call was made is the response's ``error``."""
        with translated_rpc_errors():
            return await self._stub.Generate(request, timeout=within or self._timeout)

    async def embed(
        self, request: planner_pb2.EmbedRequest, *, within: float | None = None
    ) -> planner_pb2.EmbedResponse:
        """One embeddings call, with Generate's error rules."""
        with translated_rpc_errors():
            return await self._stub.Embed(request, timeout=within or self._timeout)

    async def summarize(
        self, request: planner_pb2.SummarizeRequest
    ) -> planner_pb2.SummarizeResponse:
        """Fold the oldest turns of a session's context when it is over its budget."""
        with translated_rpc_errors():
            return await self._stub.Summarize(request, timeout=self._timeout)
