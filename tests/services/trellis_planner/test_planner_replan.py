"""The gate that keeps a REPLAN line out of the streamed answer, and replanning in a run."""

import sqlite3

from tests.support.model_script import script_of
from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime.channels import Channels
from trellis_cli.stack import start_stack
from trellis_offline_model.behaviour import Behaviour
from trellis_planner.replan import ReplanGate


def run(gate: ReplanGate, chunks: list[str]) -> str:
    out = [piece for chunk in chunks for piece in gate.feed(chunk)]
    return "".join(out + gate.close())


def test_answer_flows_through_after_the_first_differing_characters() -> None:
    gate = ReplanGate(allow_replan=True)
    assert gate.feed("RE") == []
    assert gate.feed("ady") == ["REady"]
    assert gate.feed(" now") == [" now"]
    assert (gate.replan, gate.reason) == (False, "")


def test_replan_is_withheld_and_its_reason_kept() -> None:
    gate = ReplanGate(allow_replan=True)
    assert run(gate, ["  REP", "LAN:", " need the", " kernel version\nmore"]) == ""
    assert (gate.replan, gate.reason) == (True, "need the kernel version")


def test_without_permission_a_replan_line_is_just_answer_text() -> None:
    gate = ReplanGate(allow_replan=False)
    assert run(gate, ["REPLAN: x"]) == "REPLAN: x"
    assert gate.replan is False


def test_short_output_is_released_on_close() -> None:
    gate = ReplanGate(allow_replan=True)
    assert run(gate, ["REP"]) == "REP"
    assert gate.replan is False


# --- a whole run: replans are bounded by max_replans, the last round must answer --------


async def test_a_run_replans_at_most_max_replans_times_then_must_answer(tmp_path) -> None:
    db = tmp_path / "trellis.db"
    stack = await start_stack(database_url=f"sqlite:///{db}")
    channels = Channels()
    try:
        assert stack.model is not None
        model = stack.model
        # plan (rules) · join: REPLAN · plan (rules) · join: REPLAN again, on the last round
        script_of(model).push(
            Behaviour(),
            Behaviour(text="REPLAN: need the sum as well"),
            Behaviour(),
            Behaviour(text="REPLAN: still not enough"),
        )
        client = ExecutorClient(channels.get(stack.executor_target))
        request = executor_pb2.RunRequest(
            goal="What is 2+3?", options=executor_pb2.RunOptions(max_replans=1)
        )
        events = [event async for event in client.run(request)]
    finally:
        await channels.close()
        await stack.stop()

    finished = events[-1].finished
    assert finished.status == executor_pb2.RUN_STATUS_SUCCEEDED, finished.error
    # the last round may not replan: its REPLAN line is the answer, as the model wrote it
    assert finished.answer == "REPLAN: still not enough"
    planned = [e.node_planned.call for e in events if e.WhichOneof("event") == "node_planned"]
    assert [(c.node_id, c.tool) for c in planned] == [("n1", "arithmetic"), ("n2", "arithmetic")]

    bodies = list(model.requests)
    assert len(bodies) == 4  # no third round
    first_join, last_join = bodies[1]["messages"][0]["content"], bodies[3]["messages"][0]["content"]
    assert '"REPLAN: <what is missing>"' in first_join
    assert "last round" in last_join and "REPLAN" not in last_join
    replan_context = bodies[2]["messages"][-1]["content"]
    assert "## Previous plan" in replan_context and "need the sum as well" in replan_context

    run_id = events[0].run_id
    with sqlite3.connect(db) as conn:
        ids = [row[0] for row in conn.execute("SELECT usage_id FROM usage WHERE kind = 'model'")]
    assert sorted(ids) == sorted(
        f"{run_id}/{step}" for step in ("plan/0", "join/0", "plan/1", "join/1")
    )
