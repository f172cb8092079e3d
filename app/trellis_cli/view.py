"""A run in the terminal: the DAG's nodes and states, the streamed answer, totals.

``RunView`` folds RunResponse events (or a stored Run, ``from_run``) into what is shown;
``LiveRun`` draws it for ``rich.live.Live``, re-laid out at each refresh for the console's
size: at 120 columns and more the table has a column each for tool, args, state, time and
cache; narrower, tool and args share one column and state, time and cache another, so a
row never wraps at 80 columns. Multi-line outputs (``df -h``, ``free -h``) show their first
lines, as many as the terminal's height leaves for each node; cut lines end in ``…``.
Until the first node arrives a spinner says the model is planning, with the time so far.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import from_struct, from_value, seconds, timestamp_seconds
from trellis_cli.exits import plain

STATE_STYLE = {
    "planned": "dim",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "skipped": "bright_black",
    "cancelled": "magenta",
}
#: The narrow layout's word for each state.
_SHORT_STATE = {"succeeded": "ok", "cancelled": "cancel"}
#: From this width on, the wide layout.
WIDE_COLUMNS = 120
#: Most lines of one output a row shows (live: fewer when the terminal is short).
MAX_OUTPUT_LINES = 8
#: Lines of a live view that are not node rows: title, header, rules, status line, margin.
_FRAME_LINES = 8
#: Output keys whose text is the output, in this order (command stdout, read_file...).
_TEXT_KEYS = ("stdout", "content", "text", "answer", "result")
#: Where ``trace:`` links point; ``{trace_id}`` is replaced (Jaeger's UI by default).
TRACE_URL_TEMPLATE = "TRELLIS_TRACE_URL_TEMPLATE"
DEFAULT_TRACE_URL = "http://localhost:16686/trace/{trace_id}"


def trace_url(trace_id: str) -> str:
    """The trace's address in the tracing UI (``TRELLIS_TRACE_URL_TEMPLATE``)."""
    template = os.environ.get(TRACE_URL_TEMPLATE) or DEFAULT_TRACE_URL
    return template.replace("{trace_id}", trace_id)


def output_lines(value: Any) -> list[str]:
    """The lines that say what an output is: a command's stdout, a file's content, a text,
    the one value of a one-key object, else compact JSON (one line)."""
    if isinstance(value, dict):
        text = next((value[k] for k in _TEXT_KEYS if isinstance(value.get(k), str)), None)
        if text is not None:
            value = text
        elif len(value) == 1:
            value = next(iter(value.values()))
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    return lines or [""]


def short(value: Any, width: int = 70) -> str:
    """One line that says what ``value`` is (args in the table), cut to ``width``."""
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class NodeRow:
    call: common_pb2.ToolCall
    state: str = "planned"
    #: Output lines (succeeded) or the error (other ends).
    lines: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float | None = None
    cache_hit: bool = False
    attempts: int = 0


@dataclass
class RunView:
    """Folds RunResponse events into what the terminal shows."""

    run_id: str = ""
    trace_id: str = ""
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    answer: str = ""
    finished: executor_pb2.RunFinished | None = None
    #: When the view began (monotonic): the planning indicator counts from here.
    began: float = field(default_factory=time.monotonic)

    def apply(self, event: executor_pb2.RunResponse) -> None:
        self.run_id = event.run_id or self.run_id
        kind = event.WhichOneof("event")
        if kind == "started":
            self.trace_id = event.started.trace_id
        elif kind == "node_planned":
            self.nodes[event.node_planned.call.node_id] = NodeRow(event.node_planned.call)
        elif kind == "node_started":
            row = self.nodes.get(event.node_started.node_id)
            if row is not None:
                row.state = "running"
        elif kind == "node_finished":
            self._finish_node(event.node_finished.outcome)
        elif kind == "answer_delta":
            self.answer += event.answer_delta.text
        elif kind == "finished":
            self.finished = event.finished

    @classmethod
    def from_run(cls, run: executor_pb2.Run) -> RunView:
        """The view of a stored run (``trellis runs show``)."""
        view = cls(run_id=run.run_id, trace_id=run.trace_id, answer=run.answer)
        for call in run.plan:
            view.nodes[call.node_id] = NodeRow(call)
        for outcome in run.outcomes:
            view._finish_node(outcome)
        if run.status != executor_pb2.RUN_STATUS_RUNNING:
            took = 0.0
            if run.HasField("finished_at"):
                took = timestamp_seconds(run.finished_at) - timestamp_seconds(run.created_at)
            view.finished = executor_pb2.RunFinished(
                status=run.status,
                answer=run.answer,
                usage=run.usage,
                cost_nano_usd=run.cost_nano_usd,
                cache_hits=run.cache_hits,
                error=run.error if run.HasField("error") else None,
                failed_nodes=run.failed_nodes,
            )
            view.finished.duration.FromNanoseconds(int(max(took, 0.0) * 1e9))
        return view

    def _finish_node(self, outcome: common_pb2.NodeOutcome) -> None:
        row = self.nodes.get(outcome.node_id)
        if row is None:
            return
        row.state = common_pb2.NodeStatus.Name(outcome.status).removeprefix("NODE_STATUS_").lower()
        row.cache_hit = outcome.cache_hit
        row.attempts = outcome.attempts
        if outcome.HasField("started_at") and outcome.HasField("finished_at"):
            started = timestamp_seconds(outcome.started_at)
            row.seconds = timestamp_seconds(outcome.finished_at) - started
        if outcome.status == common_pb2.NODE_STATUS_SUCCEEDED:
            row.lines = output_lines(from_value(outcome.output))
        else:
            row.error = f"{outcome.error.code}: {plain(outcome.error.message)}"

    # -- drawing --------------------------------------------------------------------------

    def table(self, width: int, output_lines: int = MAX_OUTPUT_LINES) -> Table:
        """The nodes as a table fitting ``width`` columns, ``output_lines`` per output."""
        wide = width >= WIDE_COLUMNS
        table = Table(title=f"run {self.run_id}", title_justify="left", expand=True)
        table.add_column("node", no_wrap=True, overflow="ellipsis", max_width=16 if wide else 12)
        if wide:
            table.add_column("tool", no_wrap=True, overflow="ellipsis", max_width=24)
            table.add_column("args", no_wrap=True, overflow="ellipsis", max_width=32)
            table.add_column("state", no_wrap=True)
            table.add_column("time", no_wrap=True, justify="right")
            table.add_column("cache", no_wrap=True)
        else:
            table.add_column("call", no_wrap=True, overflow="ellipsis", max_width=20)
            table.add_column("state", no_wrap=True, overflow="ellipsis", max_width=12)
        table.add_column("output", ratio=1, no_wrap=True, overflow="ellipsis")
        for node_id, row in self.nodes.items():
            deps = f" ← {','.join(row.call.depends_on)}" if row.call.depends_on else ""
            args = short(from_struct(row.call.args), 60)
            state = Text(row.state, style=STATE_STYLE.get(row.state, ""))
            took = "" if row.seconds is None else f"{row.seconds * 1000:.0f} ms"
            if row.attempts > 1:
                took += f" ({row.attempts} tries)"
            output = self._output(row, output_lines)
            if wide:
                cache = "hit" if row.cache_hit else ""
                table.add_row(node_id + deps, row.call.tool, args, state, took, cache, output)
            else:
                call = f"{row.call.tool} {args}".strip()
                compact = Text(_SHORT_STATE.get(row.state, row.state), style=state.style)
                compact.append(f" {took}".rstrip() + (" hit" if row.cache_hit else ""))
                table.add_row(node_id + deps, call, compact, output)
        return table

    @staticmethod
    def _output(row: NodeRow, most: int) -> Text:
        if row.error:
            return Text(row.error, style="red", no_wrap=False, overflow="fold")
        shown = row.lines[: max(most, 1)]
        text = Text("\n".join(shown))
        if len(row.lines) > len(shown):
            more = len(row.lines) - len(shown)
            text.append(f"\n… {more} more line{'s' if more > 1 else ''}", style="dim")
        return text

    def status_line(self) -> RenderableType | None:
        """What is happening while nothing else moves: planning, running, answering."""
        if self.finished is not None:
            return None
        took = f"{time.monotonic() - self.began:.1f} s"
        states = [row.state for row in self.nodes.values()]
        if not states:
            what = "planning"
        elif any(state in ("planned", "running") for state in states):
            done = sum(state not in ("planned", "running") for state in states)
            what = f"running · {done} of {len(states)} nodes done"
        elif not self.answer:
            what = "planning or answering"
        else:
            what = "answering"
        return Spinner("dots", Text(f"{what}… {took}", style="cyan"))

    def lines_per_output(self, height: int) -> int:
        """Output lines each node may show so the live view fits ``height`` rows."""
        free = height - _FRAME_LINES - self.answer.count("\n")
        return max(1, min(MAX_OUTPUT_LINES, free // max(len(self.nodes), 1) - 1))

    def render(self, width: int, height: int) -> RenderableType:
        parts: list[RenderableType] = []
        if self.nodes:
            parts.append(self.table(width, self.lines_per_output(height)))
        if self.answer:
            parts.append(Text("\n" + self.answer))
        if (line := self.status_line()) is not None:
            parts.append(line)
        return Group(*parts)

    def summary(self) -> list[str]:
        """Closing lines: status (with the count of failed nodes, e.g. ``status: partial
        (2 nodes failed)``), the run's error, tokens, cost, cache hits, duration, ids and
        the trace's link."""
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
            f"tokens: {tokens}" + (" (estimated)" if f.usage.estimated else ""),
            f"cost: ${f.cost_nano_usd / 1e9:.6f} ({f.cost_nano_usd} nano-USD)",
            f"cache hits: {f.cache_hits} of {len(self.nodes)} tool calls",
            f"duration: {seconds(f.duration) * 1000:.0f} ms",
            f"run_id: {self.run_id}",
            f"trace_id: {self.trace_id}",
        ]
        if self.trace_id:
            lines.append(f"trace: {trace_url(self.trace_id)}")
        return lines


class LiveRun:
    """``view`` as ``rich.live.Live`` draws it: laid out anew for the console's size at
    each refresh, so the planning indicator's clock moves and resizing reflows."""

    def __init__(self, view: RunView) -> None:
        self.view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.view.render(options.max_width, options.height or console.height)
