"""Cache warming: the tools file's ``warm`` calls, made at start and after each reload.

Each call runs through the invoker like any other (contract, policy, cache, usage,
tracing), outside any run, as its tenant: a result already cached is a hit and runs
nothing, a miss runs the tool and stores the result. The usage of what ran is the
tenant's, like a background refresh. The gateway serves only once the start-up warming
is done (``service.build`` awaits it), so the first caller of a warmed call hits.

A call that cannot warm anything is skipped with a warning, never run: an unknown tool,
one with side effects (warming must never change the world), one that is not cached,
one a tenant may not use (``TRELLIS_TENANT_TOOLS``), or one without ``tenants`` whose
results are per tenant (only a ``shared_cache`` result serves every tenant). A call
that fails is logged; neither stops the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from trellis.runtime import context
from trellis.runtime.errors import TrellisError
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import CACHE_WARM_CALLS
from trellis_toolgateway.invoker import SUCCEEDED, Call, Invoker
from trellis_toolgateway.registry import ToolLookup
from trellis_toolgateway.tools.config import WarmCall

log = get_logger(__name__)

#: Warm calls running at once (each also bounded by its tool's own concurrency).
PARALLEL = 4


def _skip_reason(
    lookup: ToolLookup, warm: WarmCall, allowed: Callable[[str, str], bool]
) -> str | None:
    entry = lookup.get(warm.tool)
    if entry is None:
        return "unknown tool"
    spec = entry.tool.spec
    if spec.side_effects:
        return "the tool has side effects"
    if not spec.cacheable or entry.tool.cache_ttl_for(warm.args) <= 0:
        return "its result is not cached (cache_ttl 0)"
    if not warm.tenants and not spec.shared_cache:
        return "results are per tenant: list tenants, or make the tool shared_cache"
    denied = [t for t in warm.tenants if not allowed(t, warm.tool)]
    if denied:
        return f"tenants not allowed the tool: {', '.join(denied)}"
    return None


async def _one(invoker: Invoker, warm: WarmCall, tenant: str) -> str:
    """Make ``warm`` for ``tenant``; its metric outcome."""
    with context.request_scope(tenant_id=tenant, detached=True):
        try:
            outcome = await invoker.invoke(Call(warm.tool, dict(warm.args)))
        except TrellisError as error:  # arguments against the contract, a full queue
            log.warning(
                "warm call refused",
                tool=warm.tool,
                tenant=tenant,
                error=error.reason,
                message=error.message,
            )
            return "failed"
    if outcome.status != SUCCEEDED:
        log.warning(
            "warm call failed",
            tool=warm.tool,
            tenant=tenant,
            error=outcome.error.code,
            message=outcome.error.message,
        )
        return "failed"
    return "hit" if outcome.cache_hit else "filled"


async def warm(
    invoker: Invoker,
    lookup: ToolLookup,
    calls: Sequence[WarmCall],
    *,
    allowed: Callable[[str, str], bool] = lambda tenant, tool: True,
) -> dict[str, int]:
    """Make ``calls`` (see the module docstring); how many ended each way. Returns once
    their results are stored."""
    counts = {"filled": 0, "hit": 0, "failed": 0, "skipped": 0}
    slots = asyncio.Semaphore(PARALLEL)

    async def run(warm: WarmCall, tenant: str) -> None:
        async with slots:
            outcome = await _one(invoker, warm, tenant)
        counts[outcome] += 1
        CACHE_WARM_CALLS.labels(tool=warm.tool, outcome=outcome).inc()

    jobs = []
    for warm_call in calls:
        reason = _skip_reason(lookup, warm_call, allowed)
        if reason is not None:
            log.warning("warm call skipped", tool=warm_call.tool, reason=reason)
            counts["skipped"] += 1
            CACHE_WARM_CALLS.labels(tool=warm_call.tool, outcome="skipped").inc()
            continue
        for tenant in warm_call.tenants or [context.DEFAULT_TENANT]:
            jobs.append(run(warm_call, tenant))
    await asyncio.gather(*jobs)
    await invoker.settled()
    if calls:
        log.info("cache warmed", **counts)
    return counts
