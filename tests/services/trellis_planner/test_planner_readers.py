"""The plan readers of the json_schema and tool_calls formats, without a model.

A node of a ``{"nodes": [...]}`` document comes out with the chunk that closes its object
(not later, not before), however the text is cut; a tool call with the delta that closes
its arguments. What a model gets wrong becomes a rejected candidate that says why.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from tests.properties.strategies import json_values
from trellis_planner.candidates import CUT_OFF, Candidate, NodeIds
from trellis_planner.chunks import ChunkParts, ToolCallDelta
from trellis_planner.json_plan import JsonPlanReader
from trellis_planner.plan_schema import FunctionNames
from trellis_planner.tool_stream import AS_TEXT, TextGate, ToolCallReader


def text(piece: str) -> ChunkParts:
    return ChunkParts("m", piece, (), None)


def calls(*deltas: ToolCallDelta, content: str = "") -> ChunkParts:
    return ChunkParts("m", content, (), None, tuple(deltas))


def node(i: int, value: object = "x") -> dict:
    return {"node_id": f"n{i}", "tool": "echo", "args": {"value": value}, "depends_on": []}


def document(nodes: list[dict], indent: int | None = None) -> str:
    return json.dumps({"nodes": nodes}, indent=indent)


# --- json_schema -------------------------------------------------------------------------


def read_all(reader: JsonPlanReader, chunks: list[str], cut_off: bool = False) -> list:
    out = [item for chunk in chunks for item in reader.feed(text(chunk))]
    return out + reader.close(cut_off)


def test_each_node_comes_out_with_the_chunk_that_closes_it() -> None:
    reader = JsonPlanReader(None)
    assert reader.feed(text('{"nodes": [{"node_id": "n1", "tool": "echo", "args": {"v')) == []
    assert reader.feed(text('alue": {"a": "}"}}')) == []  # only its args closed
    [first] = reader.feed(text(', "depends_on": []}, {"node_id": "n2"'))
    assert first.number == 1 and first.value["args"] == {"value": {"a": "}"}}
    [second] = reader.feed(text(', "tool": "echo", "args": {}, "depends_on": ["n1"]}'))
    assert second.value["depends_on"] == ["n1"]
    assert reader.feed(text("]}")) == [] and reader.close(False) == []


nodes_strategy = st.lists(
    st.builds(lambda i, v: node(i, v), st.integers(1, 99), json_values()), max_size=5
)


@given(nodes_strategy, st.lists(st.integers(0, 400), max_size=10), st.sampled_from([None, 2]))
def test_chunking_never_changes_the_nodes_or_delays_one(nodes, cuts, indent) -> None:
    doc = "```json\n" + document(nodes, indent) + "\n```"
    bounds = [0, *sorted({min(c, len(doc)) for c in cuts}), len(doc)]
    reader = JsonPlanReader(None)
    seen: list[Candidate] = []
    for a, b in itertools.pairwise(bounds):
        seen += reader.feed(text(doc[a:b]))
    seen += reader.close(False)
    assert [c.value for c in seen] == nodes
    assert [c.number for c in seen] == list(range(1, len(nodes) + 1))


def test_a_node_is_out_once_its_brace_is_fed_wherever_the_text_is_cut() -> None:
    nodes = [node(1, {"x": "a,}"}), node(2, [1, {"y": "]"}]), node(3)]
    doc = document(nodes)
    ends = []
    start = 0
    for n in nodes:
        start = doc.index(json.dumps(n), start) + len(json.dumps(n))
        ends.append(start)
    reader = JsonPlanReader(None)
    out = 0
    for i, char in enumerate(doc, 1):
        out += len(reader.feed(text(char)))
        assert out == sum(1 for end in ends if end <= i), (i, doc[:i])


def test_what_is_not_a_plan_is_one_rejected_candidate() -> None:
    [bad] = read_all(JsonPlanReader(None), ['{"nodes": [1, 2'])
    assert bad.value is None and bad.problem.startswith("not valid JSON")
    [bad] = read_all(JsonPlanReader(None), ['{"plan": []}'])
    assert bad.problem == 'must be a JSON object {"nodes": [...]}'
    [bad] = read_all(JsonPlanReader(None), ["I cannot help with that."])
    assert bad.problem.startswith('not a JSON object {"nodes"')
    assert read_all(JsonPlanReader(None), []) == []  # no output: an empty plan


def test_a_node_cut_by_the_token_limit_is_rejected_as_cut_off() -> None:
    doc = document([node(1), node(2)])
    cut = doc[: doc.index('"n2"') + 12]
    first, last = read_all(JsonPlanReader(None), [cut], cut_off=True)
    assert first.value == node(1)
    assert last.value is None and last.problem == CUT_OFF and last.number == 2


def test_a_node_over_the_limit_ends_the_plan_unread() -> None:
    reader = JsonPlanReader(64)
    [first] = reader.feed(text(document([node(1)])[:-2]))
    [long] = reader.feed(text(', {"node_id": "n2", "args": {"value": "' + "x" * 100))
    assert first.number == 1 and long.too_long is not None and long.number == 2
    assert reader.feed(text('"}}]}')) == [] and reader.close(False) == []


# --- tool_calls ---------------------------------------------------------------------------


def tool_reader(**kwargs) -> ToolCallReader:
    return ToolCallReader(NodeIds(["n1"]), FunctionNames(["echo", "calc.add"]), **kwargs)


def test_a_call_is_a_node_as_soon_as_its_arguments_close() -> None:
    reader = tool_reader()
    assert reader.feed(calls(ToolCallDelta(0, "call_a", "echo", ""))) == []
    assert reader.feed(calls(ToolCallDelta(0, "", "", '{"value": {"x"'))) == []
    [first] = reader.feed(calls(ToolCallDelta(0, "", "", ": 1}}")))
    assert first.value == {
        "node_id": "n2",  # after the run's ids
        "tool": "echo",
        "args": {"value": {"x": 1}},
        "depends_on": [],
    }
    [second] = reader.feed(calls(ToolCallDelta(1, "call_b", "calc_add", '{"a": 1, "b": 2}')))
    assert second.value["tool"] == "calc.add" and second.value["node_id"] == "n3"
    assert reader.close(False) == []


def test_unclosed_arguments_are_rejected_when_the_next_call_begins() -> None:
    reader = tool_reader()
    reader.feed(calls(ToolCallDelta(0, "call_a", "echo", '{"value": ')))
    out = reader.feed(calls(ToolCallDelta(1, "call_b", "echo", "")))
    [bad] = out
    assert bad.value is None and bad.problem.startswith("arguments are not valid JSON")
    assert (bad.call_id, bad.function, bad.arguments) == ("call_a", "echo", '{"value": ')
    [empty] = reader.close(False)  # no arguments at all: a call without parameters
    assert empty.value["args"] == {}


def test_arguments_cut_off_by_the_token_limit_say_so() -> None:
    reader = tool_reader()
    reader.feed(calls(ToolCallDelta(0, "call_a", "echo", '{"value": "abc')))
    [bad] = reader.close(True)
    assert CUT_OFF in bad.problem


def test_a_call_without_a_name_or_with_non_object_arguments_is_rejected() -> None:
    reader = tool_reader()
    [nameless] = reader.feed(calls(ToolCallDelta(0, "call_a", "", "{}")))
    assert reader.feed(calls(ToolCallDelta(1, "call_b", "echo", "[1]"))) == []
    [listed] = reader.close(False)  # no brace closed it: rejected at the end
    assert nameless.value is None and nameless.problem == "the tool call has no function name"
    assert listed.value is None
    assert listed.problem == "arguments must be a JSON object, got list"


def test_duplicate_ids_a_resent_copy_is_dropped_a_different_call_kept() -> None:
    reader = tool_reader()
    first = reader.feed(calls(ToolCallDelta(0, "call_a", "echo", '{"value": 1}')))
    copy = reader.feed(calls(ToolCallDelta(1, "call_a", "echo", '{"value": 1}')))
    other = reader.feed(calls(ToolCallDelta(2, "call_a", "echo", '{"value": 2}')))
    assert len(first) == 1 and copy == [] and len(other) == 1
    assert [c.value["node_id"] for c in [*first, *other]] == ["n2", "n3"]


def test_text_streams_as_answer_unless_it_looks_like_a_call() -> None:
    reader = tool_reader()
    assert reader.feed(calls(content="I will check ")) == ["I will check "]
    assert reader.feed(calls(content="the disk.")) == ["the disk."]
    written = tool_reader()
    assert written.feed(calls(content=' {"name": "echo", ')) == []
    [rejected] = written.close(False)
    assert rejected.problem == AS_TEXT and written.text_as_calls.strip().startswith("{")
    beside = tool_reader()
    beside.feed(calls(ToolCallDelta(0, "c", "echo", "{}"), content="<tool_call>echo"))
    assert beside.close(False) == []  # the real call ran: the copy in text is dropped
    repair = tool_reader(release_text=True)
    repair.feed(calls(content="[1, 2] is the answer"))
    assert repair.close(False) == ["[1, 2] is the answer"]


def test_text_gate_holds_only_what_may_become_a_marker() -> None:
    gate = TextGate()
    assert gate.feed("  ") == "" and gate.feed("<") == "" and gate.feed("b>") == "  <b>"
    assert gate.feed("rest") == "rest"
