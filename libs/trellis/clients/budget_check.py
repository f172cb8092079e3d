"""The budget check a caller makes before it spends: one policy for every caller.

The executor checks before each run, the planner before each model call (with the
call's estimate and reservation). Both go through ``require_budget``, so they answer
alike:

- allowed: the spending goes ahead;
- refused: RESOURCE_EXHAUSTED ``BUDGET_EXCEEDED``, naming the limit that was hit
  (daily, monthly or both) with the figures in the ErrorInfo metadata;
- not answered (cost accounting down, failing, or slower than
  ``TRELLIS_BUDGET_CHECK_TIMEOUT_SECONDS``): logged as a warning, then with
  ``TRELLIS_BUDGET_FAIL_OPEN=true`` (the default) the spending goes ahead, with false
  it is refused UNAVAILABLE ``BUDGET_UNAVAILABLE``.

Failing open is the default because an outage of cost accounting must not stop every
run: usage is still recorded (the planner's and gateway's outboxes keep it until cost
accounting is back), so an outage can cost at most what is spent during it. Every check
is counted in ``trellis_budget_checks_total{outcome}``: ``allowed``, ``denied``,
``unavailable_allowed``, ``unavailable_denied``.

The timeout bounds the whole check here, whatever the client's own timeout: a dead or
hanging cost accounting delays a run's start or a model call by at most that long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, Field

from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.errors import ResourceExhausted, Unavailable
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import BUDGET_CHECKS

log = get_logger(__name__)

DEFAULT_TIMEOUT_SECONDS = 1.0

Check = Callable[[], Awaitable[costs_pb2.CheckBudgetResponse]]


class BudgetCheckSettings(BaseModel):
    """Settings of services that check budgets (executor, planner): mixed into theirs."""

    budget_fail_open: bool = Field(
        True,
        description="When cost accounting cannot answer a budget check (down, failing,"
        " slower than TRELLIS_BUDGET_CHECK_TIMEOUT_SECONDS): true lets the run or model"
        " call go ahead (logged), false refuses it UNAVAILABLE (BUDGET_UNAVAILABLE).",
    )
    budget_check_timeout_seconds: float = Field(
        DEFAULT_TIMEOUT_SECONDS,
        gt=0,
        description="Upper bound of one budget check: what a dead cost accounting adds to"
        " a run's start or a model call at most.",
    )


@dataclass(frozen=True)
class BudgetPolicy:
    """What to do when a check cannot be answered, and how long to wait for one."""

    fail_open: bool = True
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    @classmethod
    def of(cls, settings: BudgetCheckSettings) -> BudgetPolicy:
        return cls(settings.budget_fail_open, settings.budget_check_timeout_seconds)


def limits_hit(budget: costs_pb2.CheckBudgetResponse) -> list[str]:
    """The limits (``daily``, ``monthly``) that refused ``budget``: those with no
    headroom left after holds, or too little for the estimate."""
    hit = []
    for name, limit, spent in (
        ("daily", budget.daily_limit_nano_usd, budget.spent_today_nano_usd),
        ("monthly", budget.monthly_limit_nano_usd, budget.spent_this_month_nano_usd),
    ):
        room = max(0, limit - spent - budget.reserved_nano_usd)
        if limit > 0 and (room == 0 or budget.estimated_cost_nano_usd > room):
            hit.append(name)
    return hit


def over_budget(
    budget: costs_pb2.CheckBudgetResponse, refused: str, metadata: Mapping[str, str]
) -> ResourceExhausted:
    """BUDGET_EXCEEDED for a refused check, naming the limit(s) hit and their figures."""
    hit = limits_hit(budget)
    figures = {
        "daily": (budget.daily_limit_nano_usd, budget.spent_today_nano_usd),
        "monthly": (budget.monthly_limit_nano_usd, budget.spent_this_month_nano_usd),
    }
    limit, spent = figures[hit[0]] if hit else (0, 0)
    which = f"its {' and '.join(hit)} budget{'s' if len(hit) > 1 else ''}" if hit else "budget"
    return ResourceExhausted(
        f"tenant {context.tenant()} is over {which}; {refused}",
        reason="BUDGET_EXCEEDED",
        metadata={
            **metadata,
            "limit": ",".join(hit),
            "limit_nano_usd": str(limit),
            "spent_nano_usd": str(spent),
            "reserved_nano_usd": str(budget.reserved_nano_usd),
            "estimated_cost_nano_usd": str(budget.estimated_cost_nano_usd),
        },
    )


async def require_budget(
    check: Check,
    policy: BudgetPolicy,
    *,
    refused: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Return if ``check()`` allows the spending, or cannot answer and the policy fails
    open; raise BUDGET_EXCEEDED or BUDGET_UNAVAILABLE otherwise. ``refused`` says what
    does not happen then (e.g. ``model gpt-4o not called``); ``metadata`` goes into the
    error and the log line."""
    extra = dict(metadata or {})
    try:
        async with asyncio.timeout(policy.timeout_seconds):
            budget = await check()
    except Exception as error:  # cost accounting did not answer: the policy decides
        outcome = "unavailable_allowed" if policy.fail_open else "unavailable_denied"
        BUDGET_CHECKS.labels(outcome=outcome).inc()
        log.warning(
            "budget not checked: cost accounting did not answer",
            fail_open=policy.fail_open,
            tenant=context.tenant(),
            error=repr(error),
            **extra,
        )
        if policy.fail_open:
            return
        raise Unavailable(
            f"the budget of tenant {context.tenant()} could not be checked; {refused}",
            reason="BUDGET_UNAVAILABLE",
            metadata=extra,
        ) from error
    if budget.allowed:
        BUDGET_CHECKS.labels(outcome="allowed").inc()
        return
    BUDGET_CHECKS.labels(outcome="denied").inc()
    raise over_budget(budget, refused, extra)
