"""The budget check before every model call: over budget, the call is not made.

Cost accounting owns the prices, so the planner asks CheckBudget with an estimate of 0
nano-USD, i.e. "has the tenant anything left today?" (the tenant travels as
``x-tenant-id`` on the channel, like every onward call). A refusal is RESOURCE_EXHAUSTED
with reason BUDGET_EXCEEDED, the error the executor gives before a run starts.

Fail open: when cost accounting cannot answer (down, too slow, not implementing
CheckBudget) the call goes ahead and a warning is logged. The executor checks the same
budget before each run and every call's usage is still recorded, so an outage can cost
the calls made during it; failing closed would stop all planning whenever the ledger is
unreachable. It is the same choice RecordUsage makes (see ``usage.py``).
"""

from __future__ import annotations

from typing import Protocol

from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.errors import ResourceExhausted
from trellis.runtime.logs import get_logger

log = get_logger(__name__)


class BudgetChecker(Protocol):
    """What the planner needs to ask cost accounting (``CostsClient`` satisfies it)."""

    async def check_budget(
        self, estimated_cost_nano_usd: int = 0
    ) -> costs_pb2.CheckBudgetResponse: ...


async def require_budget(checker: BudgetChecker, model: str) -> None:
    """Return if a call to ``model`` may be made; raise BUDGET_EXCEEDED if not."""
    try:
        budget = await checker.check_budget(0)
    except Exception as error:  # cost accounting unreachable: plan anyway (see above)
        log.warning(
            "budget not checked; calling the model anyway",
            model=model,
            tenant=context.tenant(),
            error=repr(error),
        )
        return
    if not budget.allowed:
        raise ResourceExhausted(
            f"tenant {context.tenant()} is over its budget; model {model} not called",
            reason="BUDGET_EXCEEDED",
            metadata={
                "model": model,
                "limit_nano_usd": str(budget.daily_limit_nano_usd),
                "spent_today_nano_usd": str(budget.spent_today_nano_usd),
            },
        )
