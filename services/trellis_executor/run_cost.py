"""What one run used and cost, as the ledger holds it, however the run ends.

The planner reports every model call twice in its Plan and Join streams: when the call
starts and when its usage is recorded (before anything that follows, errors included).
So a stream that ends, well or badly, has told the run what it cost, and the run's cost
cap counts each call as its report arrives. Tool calls cost what their outcomes say.

Three things the streams cannot tell, for which the run asks the ledger
(``GetRunUsage``) once, at its end:

- a call the run cancelled itself (the client went away, the deadline passed, the cost
  cap stopped it): the planner records its tokens as the stream is torn down, after
  the run stopped listening. The run waits for those usage ids to be in the ledger
  (``SETTLE_SECONDS`` at most);
- a call whose cost was deferred (cost accounting was out of reach when it ended);
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
from trellis_executor import ports

log = get_logger(__name__)

#: Longest a run's end waits for the ledger to hold the model calls it cancelled.
SETTLE_SECONDS = 2.0
#: How often the ledger is asked again meanwhile.
SETTLE_POLL_SECONDS = 0.02


def add_usage(total: common_pb2.Usage, usage: common_pb2.Usage) -> None:
    """Add ``usage`` to ``total`` in place (the model named last wins)."""
    if usage.model:
        total.model = usage.model
    total.input_tokens += usage.input_tokens
    total.output_tokens += usage.output_tokens
    total.cached_input_tokens += usage.cached_input_tokens
    total.cost_nano_usd += usage.cost_nano_usd
    total.estimated = total.estimated or usage.estimated


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
