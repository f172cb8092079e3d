"""Wires the executor core (runner, store) and servicer into a server.

The executor is the edge: with auth on (the default) its RPCs need an API key and run
as the key's tenant, which its channels forward to every other service.
"""

from __future__ import annotations

from grpc import aio

from trellis.clients.costs import CostsClient
from trellis.clients.planner import PlannerClient
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.channels import Channels
from trellis.runtime.server import Service
from trellis.runtime.telemetry import Telemetry
from trellis_executor.runner import Runner
from trellis_executor.servicer import ExecutorServicer
from trellis_executor.settings import ExecutorSettings
from trellis_executor.store import open_store

NAME = "executor"
SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name


async def build(settings: ExecutorSettings, telemetry: Telemetry, channels: Channels) -> Service:
    api_keys = settings.key_store()  # first: a configuration error opens nothing
    store = await open_store(
        settings.database_url, owner=settings.owner, lease_seconds=settings.lease_seconds
    )
    timeout = settings.call_timeout_seconds
    costs = CostsClient(channels.get(settings.costs_target), timeout=timeout)
    runner = Runner(
        planner=PlannerClient(
            channels.get(settings.planner_target), timeout=settings.run_timeout_seconds
        ),
        gateway=ToolGatewayClient(channels.get(settings.toolgateway_target), timeout=timeout),
        budget=CostsClient(
            channels.get(settings.costs_target), timeout=settings.budget_check_timeout_seconds
        ),
        ledger=costs,
        store=store,
        tracer=telemetry.tracer,
        settings=settings,
    )
    await runner.start()
    servicer = ExecutorServicer(runner, max_goal_bytes=settings.max_goal_bytes)

    def register(server: aio.Server) -> None:
        executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)

    return Service(
        NAME, [SERVICE_NAME], register, drain=runner.drain, aclose=store.close, api_keys=api_keys
    )
