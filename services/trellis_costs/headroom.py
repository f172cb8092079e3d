"""``trellis_budget_remaining_usd{tenant}``: what each tenant with a budget has left.

Every replica exports the gauge, and alerts read every replica's series. A call that
checks or sets a tenant's budget publishes its headroom at once, and so does a
recording (a RecordUsage, or a RecordUsages batch once) for a tenant the gauge
follows; besides, every ``interval`` seconds each replica republishes every budgeted tenant from the
ledger and drops tenants whose budget is gone, so a replica that has not served a
tenant lately does not keep exporting an old figure (its spend and holds may have
moved at the other replicas).
"""

from __future__ import annotations

import asyncio
import contextlib

from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import BUDGET_REMAINING_USD
from trellis_costs.budgets import Budgets

log = get_logger(__name__)

#: About Prometheus's scrape interval: replicas agree by the next scrape or two.
DEFAULT_INTERVAL_SECONDS = 15.0


class HeadroomGauge:
    """Publishes headrooms, on demand and from the ledger every ``interval`` seconds."""

    def __init__(self, budgets: Budgets, interval: float = DEFAULT_INTERVAL_SECONDS) -> None:
        self._budgets = budgets
        self._interval = interval
        self._published: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def follows(self, tenant_id: str) -> bool:
        """Whether the gauge exports the tenant (it has a budget, as far as this replica
        knows): only then does a recording need the tenant's headroom read again."""
        return tenant_id in self._published

    def publish(self, tenant_id: str, headroom: int | None) -> None:
        """Export ``headroom`` (nano-USD) for the tenant; None (no budget) removes it."""
        if headroom is None:
            if tenant_id in self._published:  # most tenants never had a series
                self._published.discard(tenant_id)
                BUDGET_REMAINING_USD.remove(tenant_id)
            return
        self._published.add(tenant_id)
        BUDGET_REMAINING_USD.labels(tenant=tenant_id).set(headroom / 1e9)

    async def refresh(self) -> None:
        """Every budgeted tenant from the ledger; tenants without a budget any more go."""
        headrooms = await self._budgets.headrooms()
        for tenant_id in self._published - headrooms.keys():
            self.publish(tenant_id, None)
        for tenant_id, headroom in headrooms.items():
            self.publish(tenant_id, headroom)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="budget-headroom")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # the ledger is down: try again next time
                log.warning("budget headroom not refreshed", error=repr(error))
            await asyncio.sleep(self._interval)
