"""Properties of the streaming JSON Lines plan parser (trellis_planner.jsonl) and of how
the planner core turns its bad lines into rejections.

No text, cut into chunks anywhere, makes the parser raise anything but
``JsonLinesError`` (strict) or nothing at all (non-strict); chunking never changes the
result; every rejected line becomes INVALID_PLAN; JSON values written one per line come
back unchanged, in order, with their line numbers; with a line limit, exactly the lines
over it are refused, the same lines however the text is cut, after searching each
character once.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import example, given
from hypothesis import strategies as st

from tests.properties.strategies import json_values, model_lines
from trellis.runtime.errors import InvalidArgument
from trellis_planner.candidates import _candidate
from trellis_planner.formats import PlanFormat
from trellis_planner.jsonl import JsonLine, JsonLinesError, JsonLinesParser, LineTooLong
from trellis_planner.plan_round import unreadable

#: Every reason a line of the model's plan can be rejected with (plan_round.unreadable).
LINE_REJECTION_CODES = {"INVALID_PLAN"}

texts = st.one_of(
    st.text(),
    st.lists(model_lines, max_size=8).map("\n".join),
)


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def parse(
    chunks: list[str], *, strict: bool = False, max_line_bytes: int | None = None
) -> list[JsonLine]:
    parser = JsonLinesParser(strict=strict, max_line_bytes=max_line_bytes)
    lines = [line for chunk in chunks for line in parser.feed(chunk)]
    lines += parser.close()
    assert parser.examined == sum(len(chunk) for chunk in chunks)
    return lines


def as_comparable(lines: list[JsonLine]) -> list[tuple]:
    return [(x.number, json.dumps(x.value), x.text, str(x.error)) for x in lines]


@given(texts, st.lists(st.integers(min_value=0, max_value=400), max_size=12))
@example("[" * 5000 + "\n", [])  # nested past the recursion limit
@example("1" * 5000, [3])  # over Python's int digit limit: ValueError, not JSONDecodeError
def test_non_strict_parser_never_raises_and_chunking_does_not_matter(
    text: str, cuts: list[int]
) -> None:
    whole = parse([text])
    assert as_comparable(parse(chunked(text, cuts))) == as_comparable(whole)
    numbers = [line.number for line in whole]
    assert numbers == sorted(set(numbers))
    for line in whole:
        assert line.text == line.text.strip() and line.text
        assert not line.text.startswith("```")
        if line.error is not None:
            assert isinstance(line.error, JsonLinesError)
            assert line.value is None
            assert line.error.line_number == line.number
            assert line.error.problem.startswith("not valid JSON")
            rejection = unreadable(PlanFormat.JSONL, _candidate(line), "line")
            assert isinstance(rejection, InvalidArgument)
            assert rejection.reason in LINE_REJECTION_CODES
            assert rejection.violations


@given(texts, st.lists(st.integers(min_value=0, max_value=400), max_size=12))
@example("ok\n" + "[" * 5000, [])
def test_strict_parser_raises_only_json_lines_error_at_the_first_bad_line(
    text: str, cuts: list[int]
) -> None:
    lenient = parse([text])
    bad = [line for line in lenient if line.error is not None]
    try:
        strict = parse(chunked(text, cuts), strict=True)
    except JsonLinesError as error:
        assert bad, "strict mode rejected a line the lenient mode accepted"
        assert error.line_number == bad[0].number
    else:
        assert not bad
        assert as_comparable(strict) == as_comparable(lenient)


@given(
    st.lists(json_values(), max_size=10),
    st.lists(st.sampled_from(["", "  ", "```json", "```"]), max_size=10),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_values_written_one_per_line_come_back_in_order(
    values: list, noise: list[str], trailing_newline: bool, cuts: list[int]
) -> None:
    lines: list[str] = []
    expected_numbers: list[int] = []
    for i, value in enumerate(values):
        if i < len(noise):
            lines.append(noise[i])  # blank lines and fences are skipped, but counted
        lines.append(json.dumps(value))
        expected_numbers.append(len(lines))
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    parsed = parse(chunked(text, cuts), strict=True)
    assert [line.value for line in parsed] == values
    assert [line.number for line in parsed] == expected_numbers
    assert all(line.error is None for line in parsed)


@given(
    texts,
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    st.integers(min_value=1, max_value=60),
)
@example("é" * 30 + "\n" + "[1]\n", [1, 2, 3], 59)  # 60 bytes in 30 characters
def test_a_line_limit_refuses_exactly_the_long_lines_however_the_text_is_cut(
    text: str, cuts: list[int], limit: int
) -> None:
    limited = parse([text], max_line_bytes=limit)
    assert as_comparable(parse(chunked(text, cuts), max_line_bytes=limit)) == as_comparable(limited)
    raw_lines = text.split("\n")
    too_long = {
        number
        for number, raw in enumerate(raw_lines, 1)
        if len(raw.encode("utf-8", "surrogatepass")) > limit
    }
    refused = {line.number for line in limited if isinstance(line.error, LineTooLong)}
    assert refused == too_long
    # The other lines come out as they do without a limit.
    unlimited = [line for line in parse([text]) if line.number not in too_long]
    kept = [line for line in limited if line.number not in too_long]
    assert as_comparable(kept) == as_comparable(unlimited)
