"""A run's limits: RunOptions with the server's defaults filled in and ceilings applied."""

from __future__ import annotations

from dataclasses import dataclass

from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import seconds
from trellis_executor.settings import ExecutorSettings


@dataclass(frozen=True)
class Limits:
    """RunOptions with server defaults filled in and ceilings applied."""

    max_parallel: int
    max_nodes: int
    max_replans: int
    timeout: float
    cache_mode: int
    model: str

    @classmethod
    def of(cls, options: executor_pb2.RunOptions, settings: ExecutorSettings) -> Limits:
        def pick(value: int, default: int, ceiling: int) -> int:
            return min(value, ceiling) if value > 0 else default

        return cls(
            max_parallel=pick(
                options.max_parallel, settings.max_parallel, settings.max_parallel_process
            ),
            max_nodes=pick(options.max_nodes, settings.max_nodes, settings.max_nodes),
            max_replans=min(options.max_replans, settings.max_replans)
            if options.max_replans > 0
            else settings.max_replans,
            timeout=min(
                seconds(options.timeout) or settings.run_timeout_seconds,
                settings.run_timeout_seconds,
            ),
            cache_mode=options.cache_mode,
            model=options.model,
        )
