"""Wires the planner core and servicer into a server (standalone or embedded)."""

from __future__ import annotations

from grpc import aio
from openai import AsyncOpenAI

from trellis.clients.costs import CostsClient
from trellis.planner.v1 import planner_pb2, planner_pb2_grpc
from trellis.runtime.channels import Channels
from trellis.runtime.server import Service
from trellis.runtime.telemetry import Telemetry
from trellis_planner.core import Planner
from trellis_planner.model import ChatModel
from trellis_planner.servicer import PlannerServicer
from trellis_planner.settings import PlannerSettings

NAME = "planner"
SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name
#: Client-side retries of one model call (429, 5xx, connection errors), with backoff.
MODEL_MAX_RETRIES = 2


async def build(settings: PlannerSettings, telemetry: Telemetry, channels: Channels) -> Service:
    client = AsyncOpenAI(
        base_url=settings.openai_base_url,
        api_key=settings.openai_api_key.get_secret_value(),
        timeout=settings.model_timeout_seconds,
        max_retries=MODEL_MAX_RETRIES,
    )
    model = ChatModel(client, telemetry.tracer, timeout=settings.model_timeout_seconds)
    planner = Planner(
        model,
        CostsClient(channels.get(settings.costs_target)),
        default_model=settings.model,
        max_nodes=settings.max_nodes,
    )
    servicer = PlannerServicer(planner)

    def register(server: aio.Server) -> None:
        planner_pb2_grpc.add_PlannerServiceServicer_to_server(servicer, server)

    return Service(NAME, [SERVICE_NAME], register, aclose=model.aclose)
