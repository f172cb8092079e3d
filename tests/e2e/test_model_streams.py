"""A model stream that goes wrong, end to end: the five services as processes
(``process_stack``), the offline model scripted by the test, a client calling Run.

- An event that is not JSON mid-plan: the run ends FAILED with MODEL_BAD_RESPONSE in
  ``finished`` (it was INTERNAL "internal error (JSONDecodeError)"), and the model call
  is in the ledger, estimated.
- A plan line over the planner's TRELLIS_MAX_PLAN_LINE_BYTES: INVALID_PLAN at once, the
  node before it ran, and the planner plans the next run as usual.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from tests.support.model_script import script_of
from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import InvalidArgument

FAILED = executor_pb2.RUN_STATUS_FAILED
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
LINE_LIMIT = 4096


def ledger_rows(path: Path, run_id: str) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT usage_id, estimated FROM usage WHERE run_id = ? AND kind = 'model'",
            (run_id,),
        ).fetchall()


async def run(client: ExecutorClient, run_id: str, goal: str) -> tuple[list, Exception | None]:
    events: list = []
    try:
        async for event in client.run(executor_pb2.RunRequest(run_id=run_id, goal=goal)):
            events.append(event)
    except Exception as error:  # the status after ``finished``
        return events, error
    return events, None


async def test_broken_stream_and_long_line_end_runs_with_clear_reasons(
    process_stack, model, channels, tmp_path: Path
) -> None:
    stack = await process_stack(per_service={"planner": {"TRELLIS_MAX_PLAN_LINE_BYTES": "4096"}})
    client = ExecutorClient(channels.get(stack.executor_target), timeout=60)

    script_of(model).break_stream(after_pieces=8)  # the rules' plan for the goal, cut short
    events, error = await run(client, "broken", "What is (17*23)+4?")
    assert error is None  # a failed run, not a failed call: the error is in ``finished``
    finished = events[-1].finished
    assert finished.status == FAILED, finished
    assert finished.error.code == "MODEL_BAD_RESPONSE", finished.error
    assert "sent a malformed stream: an event is not JSON" in finished.error.message
    rows: list = []
    for _ in range(100):  # the planner records usage before it answers; allow the write
        if rows := ledger_rows(tmp_path / "costs.db", "broken"):
            break
        await asyncio.sleep(0.1)
    assert rows == [("broken/plan/0", 1)]

    first = '{"node_id": "n1", "tool": "echo", "args": {"value": "before"}}\n'
    long_line = '{"node_id": "n2", "tool": "echo", "args": {"value": "' + "x" * 20_000 + '"}}\n'
    script_of(model).reply(first + long_line)
    events, error = await run(client, "long", "Echo a very long value")
    assert isinstance(error, InvalidArgument), error
    assert error.reason == "INVALID_PLAN"
    assert f"line 2 is longer than {LINE_LIMIT} bytes" in error.message
    finished = events[-1].finished
    assert finished.status == FAILED and finished.error.code == "INVALID_PLAN"
    ran = [e.node_finished.outcome.node_id for e in events if e.HasField("node_finished")]
    assert ran == ["n1"]

    events, error = await run(client, "after", "What is (17*23)+4?")
    assert error is None and events[-1].finished.status == SUCCEEDED
    assert "395" in events[-1].finished.answer
