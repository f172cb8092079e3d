"""What the executor core needs from other services (the typed clients satisfy these)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.planner.v1 import planner_pb2
from trellis.toolgateway.v1 import toolgateway_pb2


class Planner(Protocol):
    def plan(self, request: planner_pb2.PlanRequest) -> AsyncIterator[planner_pb2.PlanResponse]: ...

    def join(self, request: planner_pb2.JoinRequest) -> AsyncIterator[planner_pb2.JoinResponse]: ...

    async def summarize(
        self, request: planner_pb2.SummarizeRequest
    ) -> planner_pb2.SummarizeResponse: ...


class Gateway(Protocol):
    #: The gateway's catalog version in its latest answer.
    catalog_version: str

    async def catalog(self, known_version: str = "") -> toolgateway_pb2.ListToolsResponse: ...

    async def invoke(
        self, request: toolgateway_pb2.InvokeToolRequest
    ) -> common_pb2.NodeOutcome: ...


class Budget(Protocol):
    async def check_budget(
        self, estimated_cost_nano_usd: int = 0
    ) -> costs_pb2.CheckBudgetResponse: ...


class Ledger(Protocol):
    async def get_run_usage(self, run_id: str) -> costs_pb2.GetRunUsageResponse: ...
