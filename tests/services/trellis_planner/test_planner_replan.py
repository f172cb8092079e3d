"""The gate that keeps a REPLAN line out of the streamed answer."""

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
