"""Client of ``trellis.toolgateway.v1.ToolGatewayService``.

``catalog_version`` is the gateway's catalog version as its latest answer (ListTools or
InvokeTool) gave it, so a caller holding a copy of the catalog knows when it moved.
"""

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
        #: The gateway's catalog version in its latest answer ("" before any).
        self.catalog_version = ""

    async def list_tools(self) -> list[common_pb2.ToolSpec]:
        return list((await self.catalog()).tools)

    async def catalog(self, known_version: str = "") -> toolgateway_pb2.ListToolsResponse:
        """The whole ListTools answer; only ``unchanged`` if ``known_version`` is current."""
        request = toolgateway_pb2.ListToolsRequest(known_catalog_version=known_version)
        with translated_rpc_errors():
            response = await self._stub.ListTools(request, timeout=self._timeout)
        self._seen(response.catalog_version)
        return response

    async def invoke(self, request: toolgateway_pb2.InvokeToolRequest) -> common_pb2.NodeOutcome:
        """The outcome of one call; contract violations raise (InvalidArgument, NotFound)."""
        with translated_rpc_errors():
            response = await self._stub.InvokeTool(request, timeout=self._timeout)
        self._seen(response.catalog_version)
        return response.outcome

    def _seen(self, version: str) -> None:
        if version:  # a gateway without versions says nothing
            self.catalog_version = version

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
