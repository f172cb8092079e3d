"""The budget check before every model call: over budget, the call is not made.

Cost accounting owns the prices, so the planner sends what the call is about to use,
``estimated_usage`` (the model, its estimated input tokens, the expected output tokens),
and cost accounting prices it. The check carries ``reservation_id``: the usage_id the
call will be recorded under (``usage.py``), so an allowed estimate is held against the
budget until that usage is recorded, and concurrent calls cannot all spend the same
headroom. The tenant travels as ``x-tenant-id`` on the channel, like every onward call.
A refusal is RESOURCE_EXHAUSTED with reason BUDGET_EXCEEDED, the error the executor
gives before a run starts.

Fail open: when cost accounting cannot answer (down, too slow, not implementing
CheckBudget) the call goes ahead and a warning is logged. The executor checks the same
budget before each run and every call's usage is still recorded (kept in the outbox
until cost accounting is back), so an outage can cost the calls made during it; failing
closed would stop all planning whenever the ledger is unreachable.
"""

from __future__ import annotations

from typing import Protocol

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.errors import ResourceExhausted
from trellis.runtime.logs import get_logger

log = get_logger(__name__)


class BudgetChecker(Protocol):
    """What the planner needs to ask cost accounting (``CostsClient`` satisfies it)."""

    async def check_budget(
        self,
        estimated_cost_nano_usd: int = 0,
        *,
        estimated_usage: common_pb2.Usage | None = None,
        reservation_id: str = "",
    ) -> costs_pb2.CheckBudgetResponse: ...


async def require_budget(
    checker: BudgetChecker,
    model: str,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    reservation_id: str = "",
) -> None:
    """Return if a call to ``model`` with about these tokens may be made (holding its
    estimate under ``reservation_id``); raise BUDGET_EXCEEDED if not."""
    estimate = common_pb2.Usage(model=model, input_tokens=input_tokens, output_tokens=output_tokens)
    try:
        budget = await checker.check_budget(
            0, estimated_usage=estimate, reservation_id=reservation_id
        )
    except Exception as error:  # cost accounting unreachable: plan anyway (see above)
        log.warning(
            "budget not checked; calling the model anyway",
            model=model,
            tenant=context.tenant(),
            reservation_id=reservation_id,
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
                "estimated_cost_nano_usd": str(budget.estimated_cost_nano_usd),
            },
        )
