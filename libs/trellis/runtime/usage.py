"""Model usage (``trellis.common.v1.Usage``): adding it up, and the ledger id of a node's.

A run's usage is its planner calls plus its model-tool nodes; a node's is every attempt
of its call; all of them add the same way: tokens and nano-USD summed, ``estimated``
when any part is, and the model the last part named (an empty one keeps the total's).

A model tool's call for a node is recorded under ``{run}/{node}/model`` (its first
attempt; the gateway adds suffixes for the others): the executor looks for that row
when the node did not report its tokens, the gateway names it.
"""

from __future__ import annotations

from trellis.common.v1 import common_pb2


def add_usage(total: common_pb2.Usage, usage: common_pb2.Usage) -> None:
    """Add ``usage`` to ``total`` in place (the model named last wins)."""
    if usage.model:
        total.model = usage.model
    total.input_tokens += usage.input_tokens
    total.output_tokens += usage.output_tokens
    total.cached_input_tokens += usage.cached_input_tokens
    total.cost_nano_usd += usage.cost_nano_usd
    total.estimated = total.estimated or usage.estimated


def is_empty(usage: common_pb2.Usage) -> bool:
    """No tokens and no cost (a call that used nothing, or no call)."""
    return not (usage.input_tokens or usage.output_tokens or usage.cost_nano_usd)


def node_model_usage_id(run_id: str, node_id: str) -> str:
    """The ledger id of the first model call a model tool makes for a node."""
    return f"{run_id}/{node_id}/model"
