"""A run's limits: RunOptions with the server's defaults filled in and ceilings applied,
and the meter that holds a run to its cost limit.

Every limit of a run, where it is enforced and what the caller sees:

- ``max_nodes`` (TRELLIS_MAX_NODES): ``plan.NodeChecker``, INVALID_ARGUMENT
  ``TOO_MANY_NODES`` (an explicit plan before anything runs; a streamed plan ends the run
  FAILED with that code, then the call's status);
- ``max_replans`` (TRELLIS_MAX_REPLANS): not an error; the last round's join is told it
  may not replan, so the run answers with what it has;
- ``timeout``: the smallest of the run's option, TRELLIS_RUN_TIMEOUT_SECONDS and the
  caller's remaining deadline (less ``DEADLINE_MARGIN``, so the run's ``finished`` can
  still reach the caller), decided once when the run starts. When it passes the run
  ends FAILED with ``DEADLINE_EXCEEDED`` and every node in flight CANCELLED, whoever's
  deadline it was (``RunDeadlineExceeded``);
- ``max_cost_nano_usd`` (TRELLIS_MAX_RUN_COST_USD): ``CostMeter`` below, the run ends
  FAILED with ``RUN_COST_EXCEEDED``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import seconds
from trellis.runtime.errors import DeadlineExceeded, ResourceExhausted
from trellis_executor.settings import ExecutorSettings

#: The error code of a run stopped by its cost limit.
RUN_COST_EXCEEDED = "RUN_COST_EXCEEDED"
#: The error code of a run whose deadline passed (and of anything cut short by it).
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
#: A run bounded by its caller's deadline ends this much before it (at most this share
#: of the time left), so that its ``finished`` event still reaches the caller.
DEADLINE_MARGIN_SECONDS = 0.2
DEADLINE_MARGIN_SHARE = 0.1
#: The shortest timeout a run gets, however little time its caller left.
MIN_TIMEOUT_SECONDS = 0.001


@dataclass(frozen=True)
class Limits:
    """RunOptions with server defaults filled in and ceilings applied."""

    max_parallel: int
    max_nodes: int
    max_replans: int
    timeout: float
    cache_mode: int
    model: str
    #: Most the run may cost (nano-USD); 0 = no limit.
    max_cost_nano_usd: int = 0

    @classmethod
    def of(
        cls,
        options: executor_pb2.RunOptions,
        settings: ExecutorSettings,
        caller_remaining: float | None = None,
    ) -> Limits:
        """The run's limits; ``caller_remaining``: seconds left of the caller's deadline."""

        def pick(value: int, default: int, ceiling: int) -> int:
            return min(value, ceiling) if value > 0 else default

        timeout = min(
            seconds(options.timeout) or settings.run_timeout_seconds,
            settings.run_timeout_seconds,
        )
        if caller_remaining is not None:
            margin = min(DEADLINE_MARGIN_SECONDS, DEADLINE_MARGIN_SHARE * caller_remaining)
            timeout = min(timeout, max(caller_remaining - margin, MIN_TIMEOUT_SECONDS))

        cost_ceiling = settings.max_run_cost_nano_usd
        return cls(
            max_parallel=pick(
                options.max_parallel, settings.max_parallel, settings.max_parallel_process
            ),
            max_nodes=pick(options.max_nodes, settings.max_nodes, settings.max_nodes),
            max_replans=min(options.max_replans, settings.max_replans)
            if options.max_replans > 0
            else settings.max_replans,
            timeout=timeout,
            cache_mode=options.cache_mode,
            model=options.model,
            max_cost_nano_usd=pick(
                options.max_cost_nano_usd, cost_ceiling, cost_ceiling or options.max_cost_nano_usd
            ),
        )


class RunDeadlineExceeded(DeadlineExceeded):
    """The run's deadline passed: it stops, its nodes in flight end CANCELLED."""

    default_reason = DEADLINE_EXCEEDED


class RunCostExceeded(ResourceExhausted):
    """The run spent more than its ``max_cost_nano_usd``: it stops (not retryable, the
    same run would only spend it again)."""

    retryable = False


class CostMeter:
    """What a run has spent so far, model calls and tool calls, against its limit.

    The executor charges each cost as it learns it: a planner call's ``done`` usage and
    each node's outcome. The charge that takes the total over the limit raises
    ``RunCostExceeded`` where it happens, which stops the run: the planner stream or the
    node's task ends, the scheduler's task group cancels the nodes in flight, and
    nothing new starts. A run can so overshoot its limit by the call that crossed it
    (and nodes that finished at the same moment); it never starts anything after.
    """

    def __init__(self, limit_nano_usd: int, *, spent_nano_usd: int = 0) -> None:
        self.limit_nano_usd = limit_nano_usd
        self.spent_nano_usd = spent_nano_usd

    def charge(self, nano_usd: int, what: str) -> None:
        """Add ``nano_usd`` spent on ``what``; raise if the run is now over its limit."""
        self.spent_nano_usd += max(nano_usd, 0)
        self.check(what)

    def check(self, what: str = "") -> None:
        limit = self.limit_nano_usd
        if limit and self.spent_nano_usd > limit:
            after = f" after {what}" if what else ""
            raise RunCostExceeded(
                f"run cost {_usd(self.spent_nano_usd)} is over its limit of {_usd(limit)}{after}",
                reason=RUN_COST_EXCEEDED,
                metadata={
                    "limit_nano_usd": str(limit),
                    "cost_nano_usd": str(self.spent_nano_usd),
                },
            )


def _usd(nano: int) -> str:
    return f"${nano / 1e9:.6f}"
