"""The live view, drawn by rich's recording console at 80 and 200 columns: multi-line
outputs show their first lines, rows never wrap, the planning indicator counts time, and
a stored run (``runs show``) draws like a live one."""

from __future__ import annotations

import io

import pytest
from rich.cells import cell_len
from rich.console import Console

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import timestamp, to_struct, to_value
from trellis_cli.view import LiveRun, RunView, output_lines

DF = """\
Filesystem      Size  Used Avail Use% Mounted on
/dev/root        252G   41G  199G  17% /
devtmpfs         12G     0   12G   0% /dev
tmpfs            24G  1.1M   24G   1% /dev/shm
tmpfs           4.8G  1.2M  4.8G   1% /run
tmpfs            5.0M     0  5.0M   0% /run/lock
tmpfs            24G     0   24G   0% /sys/fs/cgroup
/dev/vdb         100G   10G   90G  10% /data
tmpfs           4.8G     0  4.8G   0% /run/user/0
tmpfs            24G     0   24G   0% /tmp
"""


def call(
    node_id: str, tool: str, args: dict, deps: tuple[str, ...] = ()
) -> executor_pb2.RunResponse:
    return executor_pb2.RunResponse(
        node_planned=executor_pb2.NodePlanned(
            call=common_pb2.ToolCall(
                node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps
            )
        )
    )


def finished(
    node_id: str, output: object = None, error: common_pb2.Error | None = None
) -> executor_pb2.RunResponse:
    outcome = common_pb2.NodeOutcome(
        node_id=node_id,
        status=common_pb2.NODE_STATUS_FAILED if error else common_pb2.NODE_STATUS_SUCCEEDED,
        started_at=timestamp(),
        finished_at=timestamp(),
        attempts=1,
    )
    if error is not None:
        outcome.error.CopyFrom(error)
    else:
        outcome.output.CopyFrom(to_value(output))
    return executor_pb2.RunResponse(node_finished=executor_pb2.NodeFinished(outcome=outcome))


def a_view() -> RunView:
    view = RunView()
    for event in [
        executor_pb2.RunResponse(
            run_id="r" * 32, started=executor_pb2.RunStarted(trace_id="ab" * 16)
        ),
        call("disk", "run_command", {"command": "df -h"}),
        call("words", "echo", {"value": "a rather long argument " * 4}),
        call("zero", "arithmetic", {"expression": "1/0"}, ("disk",)),
        finished("disk", {"command": "df -h", "exit_code": 0, "stdout": DF}),
        finished("words", "one line"),
        finished(
            "zero",
            error=common_pb2.Error(code="ARITHMETIC_ERROR", message="division by zero " * 3),
        ),
    ]:
        view.apply(event)
    return view


def draw(view: RunView, width: int, height: int = 40) -> list[str]:
    console = Console(
        record=True, width=width, height=height, file=io.StringIO(), color_system=None
    )
    console.print(LiveRun(view))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 200])
def test_no_line_is_wider_than_the_terminal(width: int) -> None:
    for line in draw(a_view(), width):
        assert cell_len(line) <= width, line


def test_at_80_columns_a_multi_line_output_shows_its_first_lines_and_rows_do_not_wrap() -> None:
    lines = draw(a_view(), 80)
    text = "\n".join(lines)
    assert "┃ call" in text and "┃ args" not in text  # the narrow layout
    disk = [i for i, line in enumerate(lines) if "disk" in line and "run_command df -h" in line]
    [first] = disk
    assert "Filesystem" in lines[first] and "ok" in lines[first]
    assert "/dev/root" in lines[first + 1]  # the / line the goal asked about is there
    assert "devtmpfs" in lines[first + 2]
    assert any("more lines" in line for line in lines[first : first + 10])
    [words] = [line for line in lines if "words" in line]  # long args: cut, not wrapped
    assert "echo a rather long" in words and "…" in words
    row = lines.index(words)
    assert lines[row + 1].split("│")[1].strip() != ""  # the next row follows at once


def test_at_200_columns_each_field_has_its_column_and_outputs_are_whole() -> None:
    lines = draw(a_view(), 200)
    header = next(line for line in lines if "node" in line and "output" in line)
    for column in ("tool", "args", "state", "time", "cache", "output"):
        assert f" {column} " in header
    assert any("/dev/root        252G   41G  199G  17% /" in line for line in lines)
    assert any(
        "zero ← disk" in line and "ARITHMETIC_ERROR: division by zero" in line for line in lines
    )


def test_a_short_terminal_shows_fewer_lines_of_each_output() -> None:
    view = a_view()
    tall = [line for line in draw(view, 200, height=60) if "tmpfs" in line or "devtmpfs" in line]
    short = [line for line in draw(view, 200, height=16) if "tmpfs" in line or "devtmpfs" in line]
    assert len(short) < len(tall)
    assert view.lines_per_output(16) >= 1


def test_planning_shows_a_spinner_with_the_time_so_far() -> None:
    view = RunView()
    view.apply(executor_pb2.RunResponse(run_id="r1", started=executor_pb2.RunStarted(trace_id="t")))
    view.began -= 2.5
    [line] = [line for line in draw(view, 80) if "planning" in line]
    assert "planning… 2.5 s" in line
    view.apply(call("n1", "echo", {"value": 1}))
    assert any("running · 0 of 1 nodes done" in line for line in draw(view, 80))
    view.apply(
        executor_pb2.RunResponse(
            finished=executor_pb2.RunFinished(status=executor_pb2.RUN_STATUS_SUCCEEDED)
        )
    )
    assert not any("…" in line and " s" in line and "running" in line for line in draw(view, 80))


def test_outputs_become_lines() -> None:
    assert output_lines({"stdout": "a\nb\n", "exit_code": 0}) == ["a", "b"]
    assert output_lines({"content": "x", "path": "f"}) == ["x"]
    assert output_lines({"result": 42}) == ["42"]
    assert output_lines([1, 2]) == ["[1, 2]"]
    assert output_lines("") == [""]


def test_the_summary_links_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    view = a_view()
    view.apply(
        executor_pb2.RunResponse(
            finished=executor_pb2.RunFinished(status=executor_pb2.RUN_STATUS_PARTIAL)
        )
    )
    assert f"trace: http://localhost:16686/trace/{'ab' * 16}" in view.summary()
    monkeypatch.setenv(
        "TRELLIS_TRACE_URL_TEMPLATE", "https://grafana.example/explore?trace={trace_id}"
    )
    assert f"trace: https://grafana.example/explore?trace={'ab' * 16}" in view.summary()


def test_a_stored_run_draws_like_a_live_one() -> None:
    live = a_view()
    run = executor_pb2.Run(
        run_id=live.run_id, trace_id=live.trace_id, status=executor_pb2.RUN_STATUS_FAILED
    )
    for row in live.nodes.values():
        run.plan.append(row.call)
    events = [finished("disk", {"stdout": DF}), finished("words", "one line")]
    for event in events:
        run.outcomes.append(event.node_finished.outcome)
    stored = RunView.from_run(run)
    assert [r.state for r in stored.nodes.values()] == ["succeeded", "succeeded", "planned"]
    assert stored.finished is not None and stored.finished.status == executor_pb2.RUN_STATUS_FAILED
    assert stored.nodes["disk"].lines == live.nodes["disk"].lines
    assert any("/dev/root" in line for line in draw(stored, 80))
