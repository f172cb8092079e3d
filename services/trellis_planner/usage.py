"""Recording what each model call used, and learning what it cost.

Costs are priced by the cost-accounting service, so the planner sends tokens and gets
nano-USD back. The ledger is idempotent on ``usage_id``, which is derived from the run,
the step and the round, so a retried Plan or Join is not charged twice. Recording must
never break planning: on failure the call still finishes, with cost 0, and the usage_id
is logged (a durable outbox arrives in a later change).

The write is shielded from cancellation: when the client goes away mid-stream, the
request's task is cancelled while the tokens are already spent, so the ledger write runs
as its own task and completes even if the caller stops waiting for it.

Usage ids (stable: the ledger deduplicates on them):

- ``{run_id}/plan/{round}``         the plan of a round (round 0 is the first plan)
- ``{run_id}/plan-repair/{round}``  the repair call of that round's plan, if any
- ``{run_id}/join/{round}``         the join of a round
- ``.../{attempt}`` is appended on a resumed run (attempt > 0); calls outside a run get
  a fresh uuid.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Protocol

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime.convert import timestamp
from trellis.runtime.logs import get_logger

log = get_logger(__name__)


class UsageRecorder(Protocol):
    """What the planner needs from cost accounting (``CostsClient`` satisfies it)."""

    async def record_usage(
        self, request: costs_pb2.RecordUsageRequest
    ) -> costs_pb2.RecordUsageResponse: ...


#: Ledger writes still running after their caller was cancelled (kept referenced).
_pending: set[asyncio.Task[int]] = set()


def usage_id(run_id: str, step: str, round_: int, attempt: int = 0) -> str:
    """``{run_id}/{step}/{round}`` (``/{attempt}`` on a resumed run); a fresh uuid for
    calls outside a run. ``step`` is ``plan``, ``plan-repair`` or ``join``."""
    if not run_id:
        return str(uuid.uuid4())
    return f"{run_id}/{step}/{round_}" + (f"/{attempt}" if attempt else "")


async def record(
    recorder: UsageRecorder,
    *,
    usage_id: str,
    run_id: str,
    usage: common_pb2.Usage,
    estimated: bool,
) -> int:
    """Record ``usage``; its cost in nano-USD, or 0 when recording failed.

    Cancelling the caller does not cancel the write: it finishes in the background.
    """
    request = costs_pb2.RecordUsageRequest(
        usage_id=usage_id,
        run_id=run_id,
        kind=costs_pb2.USAGE_KIND_MODEL,
        usage=usage,
        estimated=estimated,
        occurred_at=timestamp(),
    )
    task = asyncio.ensure_future(_send(recorder, request))
    _pending.add(task)
    task.add_done_callback(_pending.discard)
    return await asyncio.shield(task)


async def _send(recorder: UsageRecorder, request: costs_pb2.RecordUsageRequest) -> int:
    usage, usage_id, run_id = request.usage, request.usage_id, request.run_id
    try:
        response = await recorder.record_usage(request)
    except Exception as error:  # any failure: the plan or answer matters more than the ledger
        log.error(
            "usage not recorded",
            usage_id=usage_id,
            run_id=run_id,
            model=usage.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            error=repr(error),
        )
        return 0
    return response.cost_nano_usd
