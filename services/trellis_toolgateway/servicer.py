"""ToolGatewayService over gRPC: protos in, ``Invoker`` calls, protos out.

``registry`` is usually the service's ``RegistryHolder``: ListTools answers from the
registry in force at that moment.
"""

from __future__ import annotations

from grpc import aio

from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import ToolLookup


class ToolGatewayServicer(toolgateway_pb2_grpc.ToolGatewayServiceServicer):
    def __init__(self, registry: ToolLookup, invoker: Invoker) -> None:
        self._registry = registry
        self._invoker = invoker

    async def ListTools(
        self, request: toolgateway_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> toolgateway_pb2.ListToolsResponse:
        return toolgateway_pb2.ListToolsResponse(
            tools=[spec.to_proto() for spec in self._registry.specs()]
        )

    async def InvokeTool(
        self, request: toolgateway_pb2.InvokeToolRequest, context: aio.ServicerContext
    ) -> toolgateway_pb2.InvokeToolResponse:
        if not request.call.tool:
            raise InvalidArgument(
                "call.tool is required",
                reason="TOOL_REQUIRED",
                violations=[FieldViolation("call.tool", "must name a tool (see ListTools)")],
            )
        outcome = await self._invoker.invoke(
            Call.from_proto(request.call),
            run_id=request.run_id,
            idempotency_key=request.idempotency_key,
            cache_mode=request.cache_mode,
        )
        return toolgateway_pb2.InvokeToolResponse(outcome=outcome)
