"""What the ``trellis.run`` span says of a run once it ended: its totals.

So a reader sees in Jaeger's span list what a run cost and did without adding up its
children: cost (nano-USD), model tokens (GenAI usage names, the run being an
``invoke_agent`` operation), cache hits and its nodes by status. (``session.id`` is set
when the span starts, by the runner.)
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.util.types import AttributeValue

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2

#: Node statuses counted on the span as ``trellis.nodes.<status>`` (zeros included,
#: so a query for a status never misses a run).
_STATUSES = {
    common_pb2.NODE_STATUS_SUCCEEDED: "succeeded",
    common_pb2.NODE_STATUS_FAILED: "failed",
    common_pb2.NODE_STATUS_SKIPPED: "skipped",
    common_pb2.NODE_STATUS_CANCELLED: "cancelled",
}


def run_totals(
    finished: executor_pb2.RunFinished,
    planned: int,
    outcomes: Iterable[common_pb2.NodeOutcome],
) -> dict[str, AttributeValue]:
    """The span attributes of a run that ended as ``finished`` after planning
    ``planned`` nodes, of which ``outcomes`` ended."""
    totals: dict[str, AttributeValue] = {
        "trellis.cost_nano_usd": finished.cost_nano_usd,
        "gen_ai.usage.input_tokens": finished.usage.input_tokens,
        "gen_ai.usage.output_tokens": finished.usage.output_tokens,
        "trellis.cache_hits": finished.cache_hits,
        "trellis.nodes.total": planned,
    }
    counts = dict.fromkeys(_STATUSES.values(), 0)
    for outcome in outcomes:
        if (status := _STATUSES.get(outcome.status)) is not None:
            counts[status] += 1
    totals.update({f"trellis.nodes.{status}": n for status, n in counts.items()})
    return totals
