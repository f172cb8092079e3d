"""Where ``ToolUsage`` submits rows in gateway tests: kept in a list, no disk, no network."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from trellis.costs.v1 import costs_pb2


@dataclass
class RecordingOutbox:
    """Satisfies ``tool_usage.UsageSubmitter``; ``rows`` are the requests submitted."""

    rows: list[costs_pb2.RecordUsageRequest] = field(default_factory=list)

    def submit(self, request: costs_pb2.RecordUsageRequest) -> asyncio.Task[object]:
        self.rows.append(request)
        return asyncio.ensure_future(asyncio.sleep(0))
