"""The streaming JSON Lines parser: lines out as soon as complete, wherever chunks split."""

import json

import pytest

from trellis_planner.jsonl import JsonLine, JsonLinesError, JsonLinesParser, LineTooLong

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


# --- long lines: linear work, and a limit ------------------------------------------------


def long_line(size: int) -> str:
    """One JSON line of ``size`` characters (a node whose value is long)."""
    head, tail = '{"node_id": "n1", "tool": "echo", "args": {"value": "', '"}}'
    return head + "x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("size", [1, 3, 64, 4096])
def test_a_1_mb_line_in_small_chunks_is_searched_once(size: int) -> None:
    text = long_line(1_000_000) + "\n" + '{"a": 1}\n'
    parser = JsonLinesParser()
    lines = []
    for i in range(0, len(text), size):
        lines += parser.feed(text[i : i + size])
    assert [len(line.text) for line in lines] == [1_000_000, 8]
    assert lines[0].text == long_line(1_000_000)
    # Each character was searched for a newline once: the unfinished line is never
    # scanned again when a chunk is added to it (that was quadratic in its length).
    assert parser.examined == len(text)


@pytest.mark.parametrize("size", [1, 100, 4096, 1_000_000])
def test_a_line_over_the_limit_is_refused_as_soon_as_it_grows_past_it(size: int) -> None:
    limit = 64 * 1024
    text = '{"a": 1}\n' + long_line(600_000) + "\n" + '{"b": 2}\n'
    parser = JsonLinesParser(strict=False, max_line_bytes=limit)
    lines, examined_at_refusal = [], None
    for i in range(0, len(text), size):
        lines += parser.feed(text[i : i + size])
        if examined_at_refusal is None and len(lines) >= 2:
            examined_at_refusal = parser.examined
    lines += parser.close()
    assert [(x.number, x.value) for x in lines] == [(1, {"a": 1}), (2, None), (3, {"b": 2})]
    refused = lines[1].error
    assert isinstance(refused, LineTooLong)
    assert (refused.line_number, refused.limit) == (2, limit)
    assert refused.problem == f"longer than {limit} bytes"
    assert lines[1].text == long_line(600_000)[:80]  # its start only, however it was cut
    if size < limit:  # refused before its end arrived: the rest was never buffered
        assert examined_at_refusal is not None
        assert examined_at_refusal <= len('{"a": 1}\n') + limit + size


def test_the_limit_is_in_utf8_bytes_and_a_line_of_exactly_the_limit_passes() -> None:
    def parse(line: str, limit: int) -> JsonLine:
        parser = JsonLinesParser(strict=False, max_line_bytes=limit)
        [parsed] = parser.feed(line + "\n")
        return parsed

    exact = json.dumps({"v": "x" * 100})
    assert parse(exact, len(exact)).value == {"v": "x" * 100}
    assert isinstance(parse(exact, len(exact) - 1).error, LineTooLong)
    wide = json.dumps({"v": "é" * 100}, ensure_ascii=False)  # 2 bytes per é
    assert len(wide) < 150 < len(wide.encode())
    assert isinstance(parse(wide, 150).error, LineTooLong)


def test_strict_parser_raises_line_too_long_and_an_unfinished_last_line_counts() -> None:
    parser = JsonLinesParser(max_line_bytes=10)
    assert parser.feed('{"a": 1}\n') != []
    with pytest.raises(LineTooLong, match="line 2: longer than 10 bytes"):
        parser.feed('{"b": "0123456789"')  # no newline yet
