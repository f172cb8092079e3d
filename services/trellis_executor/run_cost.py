"""What one run used and cost, as the ledger holds it, however the run ends.

The planner reports every model call twice in its Plan and Join streams: when the call
starts and when its usage is recorded (before anything that follows, errors included).
So a stream that ends, well or badly, has told the run what it cost, and the run's cost
cap counts each call as its report arrives. Tool calls cost what their outcomes say, and
a model tool's node brings back the tokens its model calls spent (``NodeOutcome.usage``,
priced by the ledger), which are the run's model usage too.

What the streams and outcomes cannot tell, for which the run asks the ledger
(``GetRunUsage``) once, at its end:

- a call the run cancelled itself (the client went away, the deadline passed, the cost
  cap stopped it): the planner records its tokens as the stream is torn down, after
  the run stopped listening. The run waits for those usage ids to be in the ledger
  (``SETTLE_SECONDS`` at most);
- a call whose cost was deferred (cost accounting was out of reach when it ended), or a
  model tool's node whose tokens came back without a cost;
- a model tool's node that never reported (cancelled, cut by the deadline, its gateway
  gone): its call's row is ``{run}/{node}/model`` (``trellis.runtime.usage``);
- a resumed run: its earlier replica's calls.

No ledger round trip is made for a run whose streams all ended on their own. When the
ledger cannot be asked, or does not settle in time, the run keeps what the streams
reported (and says so in the log): the ledger gets the rest through the planner's outbox.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.logs import get_logger
from trellis.runtime.usage import add_usage, is_empty
from trellis_executor import ports

log = get_logger(__name__)

#: Longest a run's end waits for the ledger to hold the model calls it cancelled.
SETTLE_SECONDS = 2.0
#: How often the ledger is asked again meanwhile.
SETTLE_POLL_SECONDS = 0.02


class RunCost:
    """The model usage of a run's calls and the cost of its nodes, kept as reported."""

    def __init__(self, model: str = "", *, earlier: common_pb2.Usage | None = None) -> None:
        self._model = common_pb2.Usage(model=model)
        #: Usage saved by an earlier replica of a resumed run (None: not resumed).
        self._resumed = earlier is not None
        if earlier is not None:
            add_usage(self._model, earlier)
        #: Calls that started and have not reported their usage.
        self._open: set[str] = set()
        #: Calls whose cost the ledger had not priced yet when they reported.
        self._deferred: set[str] = set()

    def model_call(self, report: planner_pb2.ModelCallUsage) -> int:
        """Take one report of the planner's; the nano-USD it adds to the run."""
        if report.started:
            self._open.add(report.usage_id)
            return 0
        self._open.discard(report.usage_id)
        if report.cost_deferred:
            self._deferred.add(report.usage_id)
        add_usage(self._model, report.usage)
        return report.usage.cost_nano_usd

    def node_usage(self, usage_id: str, usage: common_pb2.Usage) -> None:
        """A model tool's node reported what its model calls used (``usage_id``: its
        first call's ledger row). The run's model stays the planner's."""
        if is_empty(usage):
            return
        model = self._model.model
        add_usage(self._model, usage)
        self._model.model = model or usage.model
        if usage.cost_nano_usd == 0:  # not priced yet (or no price): the ledger will say
            self._deferred.add(usage_id)

    def node_unreported(self, usage_id: str) -> None:
        """A model tool's node ended without reporting its tokens: find them in the ledger."""
        self._open.add(usage_id)

    def model_usage(self) -> common_pb2.Usage:
        usage = common_pb2.Usage()
        usage.CopyFrom(self._model)
        return usage

    @property
    def settled(self) -> bool:
        """The streams reported everything: the ledger has nothing to add."""
        return not (self._open or self._deferred or self._resumed)

    async def settle(self, ledger: ports.Ledger, run_id: str) -> None:
        """Take the ledger's figures for the run's model calls, once it holds every call
        this run started; keep the reported ones if it cannot be asked in time."""
        if self.settled:
            return
        waiting_for = self._open | self._deferred
        give_up = time.monotonic() + SETTLE_SECONDS
        held: costs_pb2.GetRunUsageResponse | None = None
        while True:
            try:
                # its own deadline: the run's (or its caller's) may have passed already
                with context.request_scope(timeout=SETTLE_SECONDS, detached=True):
                    held = await ledger.get_run_usage(run_id)
            except Exception as error:  # cost accounting unreachable: keep what we have
                log.warning(
                    "run usage not reconciled with the ledger", run_id=run_id, error=repr(error)
                )
                return
            if _holds(held.usage_ids, waiting_for) or time.monotonic() >= give_up:
                break
            await asyncio.sleep(SETTLE_POLL_SECONDS)
        if not _holds(held.usage_ids, waiting_for):
            log.warning(
                "model calls not in the ledger yet; the run reports what it saw",
                run_id=run_id,
                missing=sorted(waiting_for - set(held.usage_ids)),
            )
            return
        model = self._model.model
        self._model.CopyFrom(held.model_usage)
        self._model.model = held.model_usage.model or model
        self._open.clear()
        self._deferred.clear()
        self._resumed = False


def _holds(usage_ids: Iterable[str], wanted: set[str]) -> bool:
    return wanted.issubset(usage_ids)


def tool_cost(outcomes: Iterable[common_pb2.NodeOutcome]) -> int:
    return sum(outcome.cost_nano_usd for outcome in outcomes)
