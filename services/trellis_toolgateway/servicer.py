"""ToolGatewayService over gRPC: protos in, ``Invoker`` calls, protos out.

``registry`` is usually the service's ``RegistryHolder``: ListTools answers from the
registry in force at that moment. ``tenant_tools`` is checked at the entry of every
InvokeTool, before anything else (``tenancy``), and filters ListTools.
"""

from __future__ import annotations

from grpc import aio

from trellis.runtime import context as request_context
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import ToolLookup
from trellis_toolgateway.tenancy import TenantTools


class ToolGatewayServicer(toolgateway_pb2_grpc.ToolGatewayServiceServicer):
    def __init__(
        self, registry: ToolLookup, invoker: Invoker, tenant_tools: TenantTools | None = None
    ) -> None:
        self._registry = registry
        self._invoker = invoker
        self._tenant_tools = tenant_tools or TenantTools()

    async def ListTools(
        self, request: toolgateway_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> toolgateway_pb2.ListToolsResponse:
        specs = self._tenant_tools.visible(request_context.tenant(), self._registry.specs())
        return toolgateway_pb2.ListToolsResponse(tools=[spec.to_proto() for spec in specs])

    async def InvokeTool(
        self, request: toolgateway_pb2.InvokeToolRequest, context: aio.ServicerContext
    ) -> toolgateway_pb2.InvokeToolResponse:
        if not request.call.tool:
            raise InvalidArgument(
                "call.tool is required",
                reason="TOOL_REQUIRED",
                violations=[FieldViolation("call.tool", "must name a tool (see ListTools)")],
            )
        self._tenant_tools.check(request_context.tenant(), request.call.tool)
        outcome = await self._invoker.invoke(
            Call.from_proto(request.call),
            run_id=request.run_id,
            idempotency_key=request.idempotency_key,
            cache_mode=request.cache_mode,
        )
        return toolgateway_pb2.InvokeToolResponse(outcome=outcome)
