"""Live terminal view of a run: the DAG's nodes and states, the streamed answer, totals."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import from_struct, from_value, seconds, timestamp_seconds
from trellis_cli.exits import plain

_STYLE = {
    "planned": "dim",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "skipped": "bright_black",
    "cancelled": "magenta",
}


def short(value: Any, width: int = 70) -> str:
    """One line that says what an output is."""
    if isinstance(value, dict) and "stdout" in value:
        value = str(value["stdout"]).strip().splitlines()[0] if value["stdout"] else ""
    elif isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class NodeRow:
    call: common_pb2.ToolCall
    state: str = "planned"
    detail: str = ""
    seconds: float | None = None
    cache_hit: bool = False


@dataclass
class RunView:
    """Folds RunResponse events into what the terminal shows."""

    run_id: str = ""
    trace_id: str = ""
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    answer: str = ""
    finished: executor_pb2.RunFinished | None = None

    def apply(self, event: executor_pb2.RunResponse) -> None:
        self.run_id = event.run_id or self.run_id
        kind = event.WhichOneof("event")
        if kind == "started":
            self.trace_id = event.started.trace_id
        elif kind == "node_planned":
            self.nodes[event.node_planned.call.node_id] = NodeRow(event.node_planned.call)
        elif kind == "node_started":
            self.nodes[event.node_started.node_id].state = "running"
        elif kind == "node_finished":
            self._finish_node(event.node_finished.outcome)
        elif kind == "answer_delta":
            self.answer += event.answer_delta.text
        elif kind == "finished":
            self.finished = event.finished

    def _finish_node(self, outcome: common_pb2.NodeOutcome) -> None:
        row = self.nodes.get(outcome.node_id)
        if row is None:
            return
        row.state = common_pb2.NodeStatus.Name(outcome.status).removeprefix("NODE_STATUS_").lower()
        row.cache_hit = outcome.cache_hit
        row.seconds = timestamp_seconds(outcome.finished_at) - timestamp_seconds(outcome.started_at)
        if outcome.status == common_pb2.NODE_STATUS_SUCCEEDED:
            row.detail = short(from_value(outcome.output))
        else:
            row.detail = f"{outcome.error.code}: {plain(outcome.error.message)}"

    def table(self) -> Table:
        table = Table(title=f"run {self.run_id}", title_justify="left", expand=False)
        for column in ("node", "tool", "args", "state", "time", "cache", "output"):
            table.add_column(column, overflow="fold")
        for node_id, row in self.nodes.items():
            args = from_struct(row.call.args)
            deps = f" ← {', '.join(row.call.depends_on)}" if row.call.depends_on else ""
            table.add_row(
                node_id + deps,
                row.call.tool,
                short(args, 30),
                Text(row.state, style=_STYLE.get(row.state, "")),
                "" if row.seconds is None else f"{row.seconds * 1000:.0f} ms",
                "hit" if row.cache_hit else "",
                row.detail,
            )
        return table

    def render(self) -> RenderableType:
        parts: list[RenderableType] = [self.table()]
        if self.answer:
            parts.append(Text("\n" + self.answer))
        return Group(*parts)

    def summary(self) -> list[str]:
        """Closing lines: status (with the count of failed nodes, e.g. ``status: partial
        (2 nodes failed)``), the run's error, tokens, cost, cache hits, duration, trace id."""
        f = self.finished
        if f is None:
            return [f"run {self.run_id} ended without a result", f"trace_id: {self.trace_id}"]
        status = executor_pb2.RunStatus.Name(f.status).removeprefix("RUN_STATUS_").lower()
        if f.failed_nodes:
            nodes = "node" if f.failed_nodes == 1 else "nodes"
            status += f" ({f.failed_nodes} {nodes} failed)"
        lines = [f"status: {status}"]
        if f.error.code:
            lines.append(f"error: {f.error.code}: {plain(f.error.message)}")
        tokens = (
            f"{f.usage.input_tokens} in / {f.usage.output_tokens} out ({f.usage.model})"
            if f.usage.model
            else "none (no model calls)"
        )
        lines += [
            f"tokens: {tokens}",
            f"cost: ${f.cost_nano_usd / 1e9:.6f} ({f.cost_nano_usd} nano-USD)",
            f"cache hits: {f.cache_hits} of {len(self.nodes)} tool calls",
            f"duration: {seconds(f.duration) * 1000:.0f} ms",
            f"run_id: {self.run_id}",
            f"trace_id: {self.trace_id}",
        ]
        return lines
