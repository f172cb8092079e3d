"""Wires the prices, the ledger, the budgets, the headroom gauge and the servicer into a
server (standalone or embedded)."""

from __future__ import annotations

from grpc import aio

from trellis.costs.v1 import costs_pb2, costs_pb2_grpc
from trellis.runtime.channels import Channels
from trellis.runtime.server import Service
from trellis.runtime.telemetry import Telemetry
from trellis_costs.budgets import Budgets
from trellis_costs.headroom import HeadroomGauge
from trellis_costs.ledger import open_ledger
from trellis_costs.prices import PriceTable
from trellis_costs.servicer import CostAccountingServicer
from trellis_costs.settings import CostsSettings

NAME = "costs"
SERVICE_NAME = costs_pb2.DESCRIPTOR.services_by_name["CostAccountingService"].full_name


async def build(settings: CostsSettings, telemetry: Telemetry, channels: Channels) -> Service:
    prices = PriceTable.load(settings.prices_file)
    ledger = await open_ledger(settings.database_url, prices)
    budgets = Budgets(ledger, reservation_seconds=settings.budget_reservation_seconds)
    headroom = HeadroomGauge(budgets)
    servicer = CostAccountingServicer(
        ledger,
        budgets,
        prices,
        headroom,
        tenant_label=settings.metrics_tenant_label,
    )

    def register(server: aio.Server) -> None:
        costs_pb2_grpc.add_CostAccountingServiceServicer_to_server(servicer, server)

    async def aclose() -> None:
        await headroom.aclose()
        await ledger.close()

    headroom.start()
    return Service(NAME, [SERVICE_NAME], register, aclose=aclose)
