"""Client of ``trellis.toolgateway.v1.ToolGatewayService``."""

from __future__ import annotations

from grpc import aio

from trellis.common.v1 import common_pb2
from trellis.runtime.errors import translated_rpc_errors
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc


class ToolGatewayClient:
    def __init__(self, channel: aio.Channel, *, timeout: float = 60.0) -> None:
        self._stub = toolgateway_pb2_grpc.ToolGatewayServiceStub(channel)
        self._timeout = timeout

    async def list_tools(self) -> list[common_pb2.ToolSpec]:
        with translated_rpc_errors():
            response = await self._stub.ListTools(
                toolgateway_pb2.ListToolsRequest(), timeout=self._timeout
            )
        return list(response.tools)

    async def invoke(self, request: toolgateway_pb2.InvokeToolRequest) -> common_pb2.NodeOutcome:
        """The outcome of one call; contract violations raise (InvalidArgument, NotFound)."""
        with translated_rpc_errors():
            response = await self._stub.InvokeTool(request, timeout=self._timeout)
        return response.outcome
