"""Wires the gateway core and servicer into a server (standalone or embedded)."""

from __future__ import annotations

from grpc import aio

from trellis.clients.cache import CacheClient
from trellis.runtime.channels import Channels
from trellis.runtime.server import Service
from trellis.runtime.telemetry import Telemetry
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc
from trellis_toolgateway.invoker import Invoker
from trellis_toolgateway.registry import builtin_registry
from trellis_toolgateway.servicer import ToolGatewayServicer
from trellis_toolgateway.settings import GatewaySettings

NAME = "toolgateway"
SERVICE_NAME = toolgateway_pb2.DESCRIPTOR.services_by_name["ToolGatewayService"].full_name


async def build(settings: GatewaySettings, telemetry: Telemetry, channels: Channels) -> Service:
    registry = builtin_registry(
        command_timeout=settings.command_timeout_seconds,
        command_max_output_bytes=settings.command_max_output_bytes,
    )
    cache = CacheClient(channels.get(settings.cache_target), timeout=settings.cache_timeout_seconds)
    servicer = ToolGatewayServicer(registry, Invoker(registry, cache, telemetry.tracer))

    def register(server: aio.Server) -> None:
        toolgateway_pb2_grpc.add_ToolGatewayServiceServicer_to_server(servicer, server)

    return Service(NAME, [SERVICE_NAME], register)
