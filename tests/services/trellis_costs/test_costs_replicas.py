"""Cost accounting as several replicas: two ``python -m trellis_costs`` processes on one
fresh PostgreSQL database, 50 callers split across both. Holds and spend live in the
database and a check locks the tenant's budget row, so the replicas together let
through exactly what fits, never one estimate per replica.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from trellis.clients.costs import CostsClient
from trellis.costs.v1 import costs_pb2
from trellis.runtime.context import request_scope

COSTS_SERVICE = "trellis.costs.v1.CostAccountingService"
CALLERS = 50
LIMIT = 1_000_000
ESTIMATE = 30_000  # 33 calls fit under LIMIT; 50 callers want 1,500,000


@pytest.fixture
async def replicas(service_process, channels, postgres_url: str) -> list[CostsClient]:
    processes = [
        service_process(
            "trellis_costs", f"costs-{i}", COSTS_SERVICE, {"TRELLIS_DATABASE_URL": postgres_url}
        )
        for i in range(2)
    ]
    for process in processes:
        await process.wait_serving()
    return [CostsClient(channels.get(process.target), timeout=30) for process in processes]


def tool_usage(usage_id: str, cost: int) -> costs_pb2.RecordUsageRequest:
    return costs_pb2.RecordUsageRequest(
        usage_id=usage_id, kind=costs_pb2.USAGE_KIND_TOOL, tool="probe", tool_cost_nano_usd=cost
    )


async def callers(replicas: list[CostsClient], actual, *, together: bool, seed: int = 0) -> int:
    """CALLERS callers, alternating replicas for their check and picking either for their
    record (a hold may be settled at the other replica); returns how many were allowed."""
    barrier = asyncio.Barrier(CALLERS) if together else None
    pick = random.Random(seed)
    recorders = [replicas[pick.randrange(2)] for _ in range(CALLERS)]

    async def caller(i: int) -> bool:
        usage_id = f"call-{i}"
        check = await replicas[i % 2].check_budget(ESTIMATE, reservation_id=usage_id)
        if barrier is not None:
            await barrier.wait()
        if check.allowed:
            await recorders[i].record_usage(tool_usage(usage_id, actual(i)))
        return check.allowed

    return sum(await asyncio.gather(*(caller(i) for i in range(CALLERS))))


@pytest.mark.parametrize("together", [True, False], ids=["check-all-first", "interleaved"])
async def test_two_replicas_let_exactly_what_fits_through(
    replicas: list[CostsClient], together: bool
) -> None:
    first, second = replicas
    with request_scope(tenant_id="shared"):
        await first.set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=LIMIT))
        allowed = await callers(replicas, lambda i: ESTIMATE, together=together)
        total = (await second.get_usage()).total_cost_nano_usd
        after = [await replica.check_budget(0) for replica in replicas]
    assert allowed == LIMIT // ESTIMATE == 33
    assert total == allowed * ESTIMATE <= LIMIT
    for check in after:  # both replicas see the same ledger and no hold left
        assert (check.spent_today_nano_usd, check.reserved_nano_usd) == (total, 0)
        assert check.remaining_nano_usd == LIMIT - total


async def test_two_replicas_overshoot_by_at_most_one_estimate(
    replicas: list[CostsClient],
) -> None:
    """Calls cheaper than their estimate free headroom as they are recorded: more get
    through, still within one estimate of the limit."""
    with request_scope(tenant_id="cheaper"):
        await replicas[0].set_budget(costs_pb2.SetBudgetRequest(daily_limit_nano_usd=LIMIT))
        allowed = await callers(
            replicas, lambda i: ESTIMATE - (i % 7) * 1_000, together=False, seed=1
        )
        total = (await replicas[1].get_usage()).total_cost_nano_usd
    assert allowed >= LIMIT // ESTIMATE
    assert total <= LIMIT + ESTIMATE
