"""Client of ``trellis.costs.v1.CostAccountingService``."""

from __future__ import annotations

from collections.abc import Sequence

from grpc import aio

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2, costs_pb2_grpc
from trellis.runtime.errors import translated_rpc_errors


class CostsClient:
    def __init__(self, channel: aio.Channel, *, timeout: float = 5.0) -> None:
        self._stub = costs_pb2_grpc.CostAccountingServiceStub(channel)
        self._timeout = timeout

    async def record_usage(
        self, request: costs_pb2.RecordUsageRequest
    ) -> costs_pb2.RecordUsageResponse:
        """Record one usage event (idempotent on usage_id); returns its cost."""
        with translated_rpc_errors():
            return await self._stub.RecordUsage(request, timeout=self._timeout)

    async def record_usages(
        self, entries: Sequence[costs_pb2.RecordUsageRequest]
    ) -> costs_pb2.RecordUsagesResponse:
        """Record many events of the caller's tenant in one ledger transaction; a result
        per entry, in order (a refused entry carries its error)."""
        request = costs_pb2.RecordUsagesRequest(entries=entries)
        with translated_rpc_errors():
            return await self._stub.RecordUsages(request, timeout=self._timeout)

    async def check_budget(
        self,
        estimated_cost_nano_usd: int = 0,
        *,
        estimated_usage: common_pb2.Usage | None = None,
        reservation_id: str = "",
    ) -> costs_pb2.CheckBudgetResponse:
        """May the tenant spend ``estimated_cost_nano_usd`` plus ``estimated_usage``
        (priced by cost accounting)? With ``reservation_id`` (the usage_id the call will
        be recorded under), an allowed estimate is held until that RecordUsage."""
        request = costs_pb2.CheckBudgetRequest(
            estimated_cost_nano_usd=estimated_cost_nano_usd,
            estimated_usage=estimated_usage,
            reservation_id=reservation_id,
        )
        with translated_rpc_errors():
            return await self._stub.CheckBudget(request, timeout=self._timeout)

    async def set_budget(self, request: costs_pb2.SetBudgetRequest) -> None:
        """Set the limits the request's update_mask names (empty mask: both)."""
        with translated_rpc_errors():
            await self._stub.SetBudget(request, timeout=self._timeout)

    async def get_run_usage(self, run_id: str) -> costs_pb2.GetRunUsageResponse:
        """What the ledger holds for one run of the caller's tenant (empty if none)."""
        request = costs_pb2.GetRunUsageRequest(run_id=run_id)
        with translated_rpc_errors():
            return await self._stub.GetRunUsage(request, timeout=self._timeout)

    async def get_usage(
        self, tenant_id: str = "", start_day: str = "", end_day: str = "", session_id: str = ""
    ) -> costs_pb2.GetUsageResponse:
        request = costs_pb2.GetUsageRequest(
            tenant_id=tenant_id, start_day=start_day, end_day=end_day, session_id=session_id
        )
        with translated_rpc_errors():
            return await self._stub.GetUsage(request, timeout=self._timeout)
