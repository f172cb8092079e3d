"""Hypothesis strategies shared by the property tests: JSON values, hostile ones too."""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

#: A node id as the contract allows it (refs.py, validation.py): 1-64 of [A-Za-z0-9_-].
node_ids = st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True)
#: Few ids, so plans collide: duplicates, cycles, dangling and self dependencies.
small_ids = st.sampled_from(["a", "b", "c", "d", "n1", "n2", "", "x-y"])

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
#: Integers a double holds exactly (a protobuf Struct stores every number as one).
safe_ints = st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)

json_scalars = st.none() | st.booleans() | safe_ints | finite_floats | st.text(max_size=16)
json_keys = st.text(max_size=8)


def json_values(
    scalars: st.SearchStrategy = json_scalars, max_leaves: int = 16
) -> st.SearchStrategy:
    """Nested JSON (lists and objects) over ``scalars``, a few levels deep."""
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(json_keys, children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


#: Strings shaped like references, well-formed and not: what args actually carry.
reference_texts = st.one_of(
    st.sampled_from(
        [
            "$n1",
            "${n1}",
            "${n1.a}",
            "${n1.0}",
            "${n1.a.0.b}",
            "${n2.x}",
            "x ${n1.a} y",
            "${n1}${n2}",
            "$n1\n",
            "${n1.²}",
            "${n1.}",
            "${n1..a}",
            "${n1.a}}",
            "${",
            "$",
            "$$n1",
            "costs $5",
            "${n1.-1}",
            "${ghost.a}",
        ]
    ),
    st.builds(
        lambda node, path, pre, post: f"{pre}${{{node}{path}}}{post}",
        node_ids,
        st.lists(st.text(max_size=4), max_size=3).map(lambda p: "".join(f".{s}" for s in p)),
        st.text(max_size=4),
        st.text(max_size=4),
    ),
    st.builds(lambda node: f"${node}", node_ids),
)

ref_values = json_values(json_scalars | reference_texts)


def nested(depth: int, leaf: object = 1, *, as_list: bool = False) -> object:
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


#: Values no JSON document or protobuf Struct should carry, but a model's output can:
#: NaN/Infinity (Python's json accepts them), integers too large for a double, and
#: nesting far past protobuf's depth limit.
hostile_values = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400)]),
    st.builds(nested, st.integers(15, 400), st.just(1), as_list=st.booleans()),
)

arbitrary_values = json_values(json_scalars | reference_texts | hostile_values)


#: Lines a model might emit: JSON of any shape, broken JSON, fences, blank lines,
#: deep nesting and over-long integers (which Python's json refuses without a
#: JSONDecodeError).
def _dumps(value: object) -> str:
    return json.dumps(value)


model_lines = st.one_of(
    json_values().map(_dumps),
    st.text(max_size=40).map(lambda t: t.replace("\n", " ")),
    st.sampled_from(["", "   ", "```", "```json", "{", "}", "[1,", "NaN", "-Infinity", "nul"]),
    st.integers(1, 3000).map(lambda n: "[" * n),
    st.integers(4000, 6000).map(lambda n: "1" * n),
)
