"""The budget check before every model call: over budget, the call is not made.

Cost accounting owns the prices, so the planner sends what the call is about to use,
``estimated_usage`` (the model, its estimated input tokens, the expected output tokens),
and cost accounting prices it. The check carries ``reservation_id``: the usage_id the
call will be recorded under (``model_usage.py``), so an allowed estimate is held against the
budget until that usage is recorded, and concurrent calls cannot all spend the same
headroom. The tenant travels as ``x-tenant-id`` on the channel, like every onward call.

What a refusal or an unanswered check does is the shared policy of
``trellis.clients.budget_check`` (the executor's before a run is the same): BUDGET_EXCEEDED
naming the limit hit; without an answer, the call goes ahead (TRELLIS_BUDGET_FAIL_OPEN,
the default) or is refused BUDGET_UNAVAILABLE.
"""

from __future__ import annotations

from typing import Protocol

from trellis.clients.budget_check import BudgetPolicy
from trellis.clients.budget_check import require_budget as require
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2


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
    policy: BudgetPolicy,
    model: str,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    reservation_id: str = "",
) -> None:
    """Return if a call to ``model`` with about these tokens may be made (holding its
    estimate under ``reservation_id``); raise BUDGET_EXCEEDED (or BUDGET_UNAVAILABLE,
    failing closed) if not."""
    estimate = common_pb2.Usage(model=model, input_tokens=input_tokens, output_tokens=output_tokens)
    await require(
        lambda: checker.check_budget(0, estimated_usage=estimate, reservation_id=reservation_id),
        policy,
        refused=f"model {model} not called",
        metadata={"model": model, "reservation_id": reservation_id},
    )
