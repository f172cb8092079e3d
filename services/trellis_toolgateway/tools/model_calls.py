"""What model and embed tools share: the planner as their model access, usage ids and
shares, and the time a call may take.

The gateway holds no model key: a model tool's call is the planner's ``Generate`` (an
embed tool's ``Embed``), so it goes through the planner's budget check, rate limits,
fallback models, GenAI telemetry and usage recording like the planner's own calls.

Usage ids name the ledger row of each node's share of a call: ``{run}/{node}/model`` for
the first attempt, ``/{attempt}`` after it for a retry, and ``/single`` after that for a
batch item asked again on its own (``model.py``). The executor knows the first one, to
find a cancelled node's tokens in the ledger. Outside a run the planner picks an id.

The planner answers, with the call's usage, before the model call's bound (``timeout``
in the request); the RPC waits a little longer (``ANSWER_MARGIN``), so the tokens of a
call cut by its time come back to the node rather than only to the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from google.protobuf import duration_pb2

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.convert import duration
from trellis.runtime.usage import add_usage, node_model_usage_id
from trellis_toolgateway.tools.base import CallInfo, ToolError

#: Share of a call's time left for its answer to come back after the model call's bound.
ANSWER_MARGIN = 0.1
#: ... but never more than this (seconds).
MAX_ANSWER_MARGIN = 1.0
#: What the error of a tool without model access says.
NO_ACCESS = "MODEL_ACCESS_UNAVAILABLE"


class ModelAccess(Protocol):
    """The planner's Generate and Embed (``trellis.clients.planner.PlannerClient``)."""

    async def generate(
        self, request: planner_pb2.GenerateRequest, *, within: float | None = None
    ) -> planner_pb2.GenerateResponse: ...

    async def embed(
        self, request: planner_pb2.EmbedRequest, *, within: float | None = None
    ) -> planner_pb2.EmbedResponse: ...


def usage_id(call: CallInfo, suffix: str = "") -> str:
    """The ledger id of ``call``'s share of a model call ("" outside a run)."""
    if not call.run_id:
        return ""
    base = node_model_usage_id(call.run_id, call.node_id)
    if call.attempt > 1:
        base += f"/{call.attempt}"
    return f"{base}/{suffix}" if suffix else base


def share(call: CallInfo, weight: int, suffix: str = "") -> planner_pb2.UsageShare:
    return planner_pb2.UsageShare(
        run_id=call.run_id,
        node_id=call.node_id,
        usage_id=usage_id(call, suffix),
        weight=max(weight, 1),
    )


def time_budget(timeout: float) -> tuple[duration_pb2.Duration, float]:
    """(the model call's bound, the RPC's timeout in seconds) for a tool of ``timeout``
    seconds, inside the current call's deadline."""
    left = context.remaining()
    bound = timeout if left is None else max(min(timeout, left), 0.001)
    margin = min(MAX_ANSWER_MARGIN, bound * ANSWER_MARGIN)
    return duration(bound - margin), bound


def usages(
    response_usage: Sequence[planner_pb2.ModelCallUsage], count: int
) -> list[common_pb2.Usage]:
    """The usage of each of ``count`` shares (empty ones if the planner sent fewer)."""
    found = [item.usage for item in response_usage]
    return [found[i] if i < len(found) else common_pb2.Usage() for i in range(count)]


def plus(*parts: common_pb2.Usage) -> common_pb2.Usage:
    total = common_pb2.Usage()
    for part in parts:
        add_usage(total, part)
    return total


def failure(error: common_pb2.Error, tool: str, usage: common_pb2.Usage) -> ToolError:
    """A model call's in-band error as the tool's failure, carrying what it spent."""
    return ToolError(
        error.code or "MODEL_FAILED",
        error.message or f"{tool}: the model call failed",
        retryable=error.retryable,
        details={"tool": tool},
        usage=usage,
    )


def no_access(tool: str) -> ToolError:
    return ToolError(NO_ACCESS, f"{tool}: the gateway has no planner to call models through")
