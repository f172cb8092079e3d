"""The streaming JSON Lines parser: lines out as soon as complete, wherever chunks split."""

import pytest

from trellis_planner.jsonl import JsonLinesError, JsonLinesParser

OUTPUT = (
    "```jsonl\n"
    '{"node_id": "n1", "tool": "echo", "args": {"value": "a\\nb"}}\n'
    "\n"
    '  {"node_id": "n2", "tool": "echo", "args": {"value": "{}"}}  \r\n'
    "```\n"
)
EXPECTED = [
    (2, {"node_id": "n1", "tool": "echo", "args": {"value": "a\nb"}}),
    (4, {"node_id": "n2", "tool": "echo", "args": {"value": "{}"}}),
]


def parse_in_chunks(text: str, size: int) -> list[tuple[int, object]]:
    parser = JsonLinesParser()
    out = []
    for i in range(0, len(text), size):
        out += parser.feed(text[i : i + size])
    out += parser.close()
    return [(line.number, line.value) for line in out]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 1000])
def test_fences_and_blank_lines_are_skipped_wherever_chunks_split(size: int) -> None:
    assert parse_in_chunks(OUTPUT, size) == EXPECTED


def test_a_line_is_emitted_as_soon_as_its_newline_arrives() -> None:
    parser = JsonLinesParser()
    assert parser.feed('{"a": 1') == []
    assert [line.value for line in parser.feed('}\n{"b"')] == [{"a": 1}]
    assert parser.feed("") == []


def test_last_line_without_newline_is_parsed_on_close() -> None:
    parser = JsonLinesParser()
    assert parser.feed('{"a": 1}\n{"b": 2}') != []
    assert [(line.number, line.value) for line in parser.close()] == [(2, {"b": 2})]
    assert parser.close() == []


def test_bad_line_names_its_line_number() -> None:
    parser = JsonLinesParser()
    parser.feed('{"a": 1}\n\n')
    with pytest.raises(JsonLinesError) as raised:
        parser.feed("Here is the plan:\n")
    assert raised.value.line_number == 3
    assert "line 3: not valid JSON" in str(raised.value)
    assert "Here is the plan:" in str(raised.value)


def test_truncated_last_line_is_an_error_on_close() -> None:
    parser = JsonLinesParser()
    parser.feed('{"a": 1}\n{"b": ')
    with pytest.raises(JsonLinesError, match="line 2"):
        parser.close()


def test_lenient_parser_returns_bad_lines_and_goes_on() -> None:
    parser = JsonLinesParser(strict=False)
    lines = parser.feed('{"a": 1}\nHere is the plan:\n{"b": 2}\n') + parser.feed("{oops")
    lines += parser.close()
    assert [(x.number, x.value, x.error is None) for x in lines] == [
        (1, {"a": 1}, True),
        (2, None, False),
        (3, {"b": 2}, True),
        (4, None, False),
    ]
    assert lines[1].text == "Here is the plan:" and lines[1].error.line_number == 2
    assert "not valid JSON" in lines[3].error.problem
