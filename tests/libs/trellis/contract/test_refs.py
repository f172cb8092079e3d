"""Argument references: whole values, nested paths, interpolation, errors."""

import pytest

from trellis.contract.refs import referenced_nodes, resolve
from trellis.runtime.errors import InvalidArgument

OUTPUTS = {"n1": {"items": [{"name": "a"}, {"name": "b"}], "n": 3}, "n2": "text"}


def test_whole_reference_keeps_the_type() -> None:
    assert resolve({"x": "$n1"}, OUTPUTS) == {"x": OUTPUTS["n1"]}
    assert resolve({"x": "${n1.n}"}, OUTPUTS) == {"x": 3}


def test_path_into_lists_and_dicts() -> None:
    assert resolve({"x": "${n1.items.1.name}"}, OUTPUTS) == {"x": "b"}


def test_references_inside_text_are_interpolated() -> None:
    assert resolve({"x": ["n=${n1.n}, t=${n2}"]}, OUTPUTS) == {"x": ["n=3, t=text"]}


def test_plain_strings_are_untouched() -> None:
    assert resolve({"x": "costs $5", "y": 1.5}, OUTPUTS) == {"x": "costs $5", "y": 1.5}


@pytest.mark.parametrize("ref", ["${n1.missing}", "${n1.items.7}", "$n9", "${n9.a}"])
def test_unresolvable_reference_names_the_field(ref: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        resolve({"deep": {"x": ref}}, OUTPUTS)
    assert raised.value.reason == "REFERENCE_UNRESOLVED"
    assert raised.value.violations[0].field == "args.deep.x"


def test_referenced_nodes_finds_all_forms() -> None:
    args = {"a": "$n1", "b": ["x ${n2.y} ${n3}"], "c": {"d": "$not a ref"}}
    assert referenced_nodes(args) == ["n1", "n2", "n3"]


def test_references_finds_whole_and_braced_forms_once() -> None:
    assert referenced_nodes({"a": "$n1", "b": ["${n2.x} and ${n1}"], "c": "$n3 text", "d": 5}) == [
        "n1",
        "n2",
    ]
