"""ToolGatewayService over gRPC: protos in, ``Invoker`` calls, protos out.

``registry`` is usually the service's ``RegistryHolder``: ListTools answers from the
registry in force at that moment (its tools, ``catalog_version``, the state of each tool
source and the names that clash), or only "unchanged" to a caller that holds that
version already. Every InvokeTool answer carries the ``catalog_version`` too, so a caller
learns at once that the catalog moved. An InvokeTool's ids and args are checked first
(``check_invoke``: the run, node and tool ids, the idempotency key and the args bounds of
``trellis.runtime.validation``), then ``tenant_tools`` (``tenancy``), which also filters
ListTools: a tenant restricted to some tools sees only the sources serving them and the
collisions of their names. InvalidateCache is checked the same way
(``check_invalidate``), then scoped by ``admins`` (``cache_admin``): a caller drops its
own tenant's results unless it is an admin tenant.
"""

from __future__ import annotations

from grpc import aio

from trellis.runtime import context as request_context
from trellis.runtime.convert import from_struct
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis.runtime.validation import (
    IDEMPOTENCY_KEY,
    NODE_ID,
    RUN_ID,
    TENANT_ID,
    TOOL_NAME,
    Problems,
    struct_args_problem,
)
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc
from trellis_toolgateway.cache_admin import CacheAdmins
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import SourceHandle, ToolLookup, ToolRegistry
from trellis_toolgateway.sources import SourceState
from trellis_toolgateway.tenancy import TenantTools


class ToolGatewayServicer(toolgateway_pb2_grpc.ToolGatewayServiceServicer):
    def __init__(
        self,
        registry: ToolLookup,
        invoker: Invoker,
        tenant_tools: TenantTools | None = None,
        admins: CacheAdmins | None = None,
    ) -> None:
        self._registry = registry
        self._invoker = invoker
        self._tenant_tools = tenant_tools or TenantTools()
        self._admins = admins or CacheAdmins()

    async def ListTools(
        self, request: toolgateway_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> toolgateway_pb2.ListToolsResponse:
        catalog = self._registry.snapshot()
        if request.known_catalog_version == catalog.version:
            return toolgateway_pb2.ListToolsResponse(
                catalog_version=catalog.version, unchanged=True
            )
        tenant = request_context.tenant()
        specs = self._tenant_tools.visible(tenant, catalog.specs())
        restricted = self._tenant_tools.restricted(tenant)
        shown = {spec.name for spec in specs}
        return toolgateway_pb2.ListToolsResponse(
            tools=[spec.to_proto() for spec in specs],
            catalog_version=catalog.version,
            sources=[
                _source_status(handle, catalog.served.get(handle.name, 0))
                for handle in catalog.sources
                if not restricted or _serves_any(catalog, handle, shown)
            ],
            collisions=[
                toolgateway_pb2.ToolNameCollision(
                    tool=c.tool, served_by=c.served_by, skipped=c.skipped
                )
                for c in catalog.collisions
                if not restricted or c.tool in shown
            ],
        )

    async def InvokeTool(
        self, request: toolgateway_pb2.InvokeToolRequest, context: aio.ServicerContext
    ) -> toolgateway_pb2.InvokeToolResponse:
        check_invoke(request)
        self._tenant_tools.check(request_context.tenant(), request.call.tool)
        outcome = await self._invoker.invoke(
            Call.from_proto(request.call),
            run_id=request.run_id,
            idempotency_key=request.idempotency_key,
            cache_mode=request.cache_mode,
        )
        return toolgateway_pb2.InvokeToolResponse(
            outcome=outcome, catalog_version=self._registry.snapshot().version
        )

    async def InvalidateCache(
        self, request: toolgateway_pb2.InvalidateCacheRequest, context: aio.ServicerContext
    ) -> toolgateway_pb2.InvalidateCacheResponse:
        check_invalidate(request)
        caller = request_context.tenant()
        tenant = self._admins.scope(caller, request.tenant_id, request.all_tenants)
        if tenant == caller:
            self._tenant_tools.check(caller, request.tool)
        removed = await self._invoker.invalidate(request.tool, tenant, from_struct(request.args))
        return toolgateway_pb2.InvalidateCacheResponse(invalidated=removed)


_STATES = {
    SourceState.CONNECTING: toolgateway_pb2.TOOL_SOURCE_STATE_CONNECTING,
    SourceState.UP: toolgateway_pb2.TOOL_SOURCE_STATE_UP,
    SourceState.DOWN: toolgateway_pb2.TOOL_SOURCE_STATE_DOWN,
}


def _source_status(handle: SourceHandle, served: int) -> toolgateway_pb2.ToolSourceStatus:
    return toolgateway_pb2.ToolSourceStatus(
        name=handle.name,
        kind=handle.kind,
        state=_STATES[handle.state],
        error=handle.error,
        tools=served,
    )


def _serves_any(catalog: ToolRegistry, handle: SourceHandle, names: set[str]) -> bool:
    """Whether ``handle``'s source serves one of ``names`` in ``catalog``."""
    return any(
        entry.tool.spec.name in names and catalog.get(entry.tool.spec.name) is entry
        for entry in handle.entries
    )


def check_invoke(request: toolgateway_pb2.InvokeToolRequest) -> None:
    """``TOOL_REQUIRED`` without a tool; ``INVALID_ID`` for an id or key that breaks its
    rule, ``ARGS_INVALID`` for args past their bounds (both before the tool is looked up).

    The idempotency key is the caller's, checked for its shape only: the executor's
    ``run_id/node_id`` cannot be ambiguous since neither id may hold ``/``.
    """
    if not request.call.tool:
        raise InvalidArgument(
            "call.tool is required",
            reason="TOOL_REQUIRED",
            violations=[FieldViolation("call.tool", "must name a tool (see ListTools)")],
        )
    problems = Problems()
    problems.check_id("call.tool", request.call.tool, TOOL_NAME)
    problems.check_id("run_id", request.run_id, RUN_ID)
    problems.check_id("call.node_id", request.call.node_id, NODE_ID)
    problems.check_id("idempotency_key", request.idempotency_key, IDEMPOTENCY_KEY)
    if (problem := struct_args_problem(request.call.args)) is not None:
        problems.add("ARGS_INVALID", "call.args", problem)
    problems.refuse("tool call")


def check_invalidate(request: toolgateway_pb2.InvalidateCacheRequest) -> None:
    """``TOOL_REQUIRED`` without a tool; ``INVALID_ID`` for a tool or tenant id that breaks
    its rule, ``ARGS_INVALID`` for args past their bounds (before anything is looked up)."""
    if not request.tool:
        raise InvalidArgument(
            "tool is required",
            reason="TOOL_REQUIRED",
            violations=[FieldViolation("tool", "must name a tool (see ListTools)")],
        )
    problems = Problems()
    problems.check_id("tool", request.tool, TOOL_NAME)
    problems.check_id("tenant_id", request.tenant_id, TENANT_ID)
    if (problem := struct_args_problem(request.args)) is not None:
        problems.add("ARGS_INVALID", "args", problem)
    problems.refuse("cache invalidation")
