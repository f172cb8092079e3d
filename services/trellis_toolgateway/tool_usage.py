"""Recording each tool execution with cost accounting, without making the call wait.

The invoker reports every execution that reached the tool's backend (``attempts > 0``:
not a cache hit, not a single-flight follower, not an idempotent replay, which ran
nothing) as one ``RecordUsageRequest`` of kind ``USAGE_KIND_TOOL``: the tool, the run
and node, and the outcome's cost (``spec.cost_nano_usd`` per attempt). It is handed to
the service's durable usage outbox (``trellis.clients.usage_outbox``) in the background, so the
InvokeTool response never waits for cost accounting, and an outage only delays the
row: the outbox keeps it on disk and redelivers it under the same tenant. The outbox
sends rows in batches (one RecordUsages, one ledger transaction, after
``TRELLIS_USAGE_BATCH_SECONDS``, 20 ms; a zero-cost row may wait up to
``TRELLIS_USAGE_FREE_BATCH_SECONDS``, 1 s, for the next batch), so a zero-cost tool's row
costs no ledger write of its own and the send does not land on the executor's next
dispatch. A run's cost does not wait for these rows: the executor adds the outcomes' costs.

A model tool's call that declares no cost of its own is not a tool row: the planner
records its model call under ``{run}/{node}/model``, which says all there is (a zero-cost
tool row beside it would only be one more ledger write per node).

The usage_id is decided here, once per execution, before any delivery:
``{run_id}/{node_id}/tool/{12 hex digits}`` (a uuid for calls outside a run). A
redelivery of it is deduplicated by the ledger; a genuinely repeated execution (the
executor retrying the node) gets a new id and is counted, as it was paid for.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Protocol

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.convert import timestamp


class UsageSubmitter(Protocol):
    """Background delivery (``trellis.clients.usage_outbox.UsageOutbox`` satisfies it)."""

    def submit(self, request: costs_pb2.RecordUsageRequest) -> asyncio.Task[object]: ...


def tool_usage_id(run_id: str, node_id: str) -> str:
    """A new id for one execution: ``{run_id}/{node_id}/tool/{hex}``, or ``tool/{uuid}``."""
    if not run_id:
        return f"tool/{uuid.uuid4()}"
    return f"{run_id}/{node_id}/tool/{uuid.uuid4().hex[:12]}"


class ToolUsage:
    """The invoker's usage sink: one ledger row per execution, delivered in the background."""

    def __init__(self, outbox: UsageSubmitter) -> None:
        self._outbox = outbox

    def executed(
        self,
        *,
        tool: str,
        run_id: str,
        node_id: str,
        outcome: common_pb2.NodeOutcome,
        model_tool: bool = False,
    ) -> None:
        """Record ``outcome`` if it reached the backend (the current tenant pays)."""
        if outcome.attempts <= 0 or (model_tool and outcome.cost_nano_usd == 0):
            return
        self._outbox.submit(
            costs_pb2.RecordUsageRequest(
                usage_id=tool_usage_id(run_id, node_id),
                run_id=run_id,
                node_id=node_id,
                kind=costs_pb2.USAGE_KIND_TOOL,
                tool=tool,
                tool_cost_nano_usd=outcome.cost_nano_usd,
                occurred_at=timestamp(),
                session_id=context.session(),
            )
        )
