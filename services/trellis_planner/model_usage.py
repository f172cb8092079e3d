"""Recording what each model call used, and learning what it cost.

Costs are priced by the cost-accounting service, so the planner sends tokens and gets
nano-USD back. Every record goes through the service's durable usage outbox
(``trellis.clients.usage_outbox``): when cost accounting cannot take it now, the event is
kept on disk and redelivered later, under the same tenant, and the call's cost is
reported as deferred (the ledger has the real figure once the event arrives). The
ledger is idempotent on ``usage_id``, which is derived from the run, the step and the
round, so a redelivery, or a retried Plan or Join, is not charged twice.

The write is shielded from cancellation (the outbox delivers in a task of its own):
when the client goes away mid-stream, the request's task is cancelled while the tokens
are already spent, so the ledger write completes even if the caller stops waiting.

Usage ids (stable: the ledger deduplicates on them; the budget reservation of a call
uses the same id, so recording the call settles it):

- ``{run_id}/plan/{round}``         the plan of a round (round 0 is the first plan)
- ``{run_id}/plan-repair/{round}``  the repair call of that round's plan, if any
- ``{run_id}/join/{round}``         the join of a round (tool_calls: it may call round + 1's
  tools, and then no ``plan`` call is made for round + 1)
- ``{run_id}/join-repair/{round}``  the repair call of those tool calls, if any
- ``.../{attempt}`` is appended on a resumed run (attempt > 0); calls outside a run get
  a fresh uuid.
- ``{run_id}/{node_id}/model[/...]``  a model tool's call for a node (``Generate``,
  ``Embed``): the caller names it (``generate.py``), the node's id is on the row too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.convert import timestamp

if TYPE_CHECKING:
    from trellis_planner.model import ChatCall


class UsageSender(Protocol):
    """Where usage goes (``trellis.clients.usage_outbox.UsageOutbox`` satisfies it): the
    response, or None when the event was kept for a later delivery; never raises for a
    failed one."""

    async def send(
        self, request: costs_pb2.RecordUsageRequest
    ) -> costs_pb2.RecordUsageResponse | None: ...


def usage_id(run_id: str, step: str, round_: int, attempt: int = 0) -> str:
    """``{run_id}/{step}/{round}`` (``/{attempt}`` on a resumed run); a fresh uuid for
    calls outside a run. ``step`` is ``plan``, ``plan-repair``, ``join`` or ``join-repair``."""
    if not run_id:
        return str(uuid.uuid4())
    return f"{run_id}/{step}/{round_}" + (f"/{attempt}" if attempt else "")


async def record(
    sender: UsageSender,
    *,
    usage_id: str,
    run_id: str,
    usage: common_pb2.Usage,
    estimated: bool,
    node_id: str = "",
) -> int | None:
    """Record ``usage``; its cost in nano-USD, or None when it is delivered later.

    Cancelling the caller does not cancel the write: it finishes in the background.
    """
    request = costs_pb2.RecordUsageRequest(
        usage_id=usage_id,
        run_id=run_id,
        node_id=node_id,
        kind=costs_pb2.USAGE_KIND_MODEL,
        usage=usage,
        estimated=estimated,
        occurred_at=timestamp(),
        session_id=context.session(),
    )
    response = await sender.send(request)
    return None if response is None else response.cost_nano_usd


@dataclass(frozen=True)
class CallUsage:
    """What the model call ``usage_id`` used, and cost as the ledger priced it;
    ``deferred``: cost accounting was out of reach, the ledger prices it later."""

    usage_id: str
    usage: common_pb2.Usage
    deferred: bool


async def record_call(sender: UsageSender, call: ChatCall, run_id: str) -> CallUsage:
    """Record a chat call's usage (``ChatCall.usage``: zero tokens when the endpoint never
    answered — the row still tells the ledger, and whoever waits for the call, that it is
    over) under its own usage id."""
    usage = call.usage()
    cost = await record(
        sender, usage_id=call.usage_id, run_id=run_id, usage=usage, estimated=usage.estimated
    )
    usage.cost_nano_usd = cost or 0
    return CallUsage(call.usage_id, usage, deferred=cost is None)
