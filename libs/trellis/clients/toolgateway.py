"""Client of ``trellis.toolgateway.v1.ToolGatewayService``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from grpc import aio

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import to_struct
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

    async def invalidate_cache(
        self,
        tool: str,
        *,
        tenant_id: str = "",
        all_tenants: bool = False,
        args: Mapping[str, Any] | None = None,
    ) -> int:
        """Drop ``tool``'s cached results (the caller's tenant's unless it names another,
        or all, as an admin tenant), only those for ``args`` values if given; how many."""
        request = toolgateway_pb2.InvalidateCacheRequest(
            tool=tool,
            tenant_id=tenant_id,
            all_tenants=all_tenants,
            args=to_struct(dict(args or {})),
        )
        with translated_rpc_errors():
            response = await self._stub.InvalidateCache(request, timeout=self._timeout)
        return response.invalidated
