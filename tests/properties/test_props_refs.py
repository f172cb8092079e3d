"""Properties of argument references (trellis.contract.refs): ``"$n1"`` and ``"${n1.path}"``.

Whatever the args and the outputs, ``referenced_nodes`` never raises and ``resolve``
raises only InvalidArgument ``REFERENCE_UNRESOLVED``; args without references are left
alone; a reference to a path that exists resolves to exactly the value there; and the
executor replaces a string by a non-string only when the planner's validator treats it
as a whole reference too (so what the planner checked against the tool's schema is
what the tool gets).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests.properties.strategies import (
    json_keys,
    json_values,
    node_ids,
    ref_values,
    reference_texts,
)
from trellis.contract.refs import referenced_nodes, resolve
from trellis.runtime.errors import InvalidArgument
from trellis_planner.validation import is_whole_reference

#: Every reason resolve() can refuse with.
RESOLVE_CODES = {"REFERENCE_UNRESOLVED"}
_ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")

outputs_maps = st.dictionaries(
    st.sampled_from(["n1", "n2", "x-y", "a"]) | node_ids, json_values(), max_size=4
)


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


@given(ref_values)
def test_referenced_nodes_never_raises_and_names_ids_present_in_the_args(value: Any) -> None:
    found = referenced_nodes(value)
    assert len(found) == len(set(found))
    texts = strings_in(value)
    for node_id in found:
        assert node_id and set(node_id) <= _ID_CHARS
        assert any(f"${node_id}" in t or f"${{{node_id}" in t for t in texts)


@given(ref_values, outputs_maps)
@example({"x": "${n1.²}"}, {"n1": [1, 2, 3]})  # "²".isdigit(), but int("²") fails
def test_resolve_raises_only_reference_unresolved(value: Any, outputs: dict) -> None:
    try:
        resolve(value, outputs)
    except InvalidArgument as error:
        assert error.reason in RESOLVE_CODES
        assert error.violations and all(v.field.startswith("args") for v in error.violations)


@given(json_values(), outputs_maps)
def test_args_without_references_are_left_alone(value: Any, outputs: dict) -> None:
    assume(not referenced_nodes(value))
    assert resolve(value, outputs) == value


@st.composite
def output_and_path(draw: st.DrawFn) -> tuple[Any, list[str], Any]:
    """An output value, a path of segments into it, and the value at that path."""
    output = draw(json_values())
    path: list[str] = []
    here = output
    while draw(st.booleans()):
        if isinstance(here, dict):
            keys = [k for k in here if k and not set(k) & set(".{}")]
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            path.append(key)
            here = here[key]
        elif isinstance(here, list) and here:
            index = draw(st.integers(0, len(here) - 1))
            path.append(str(index))
            here = here[index]
        else:
            break
    return output, path, here


@given(node_ids, output_and_path(), st.text(max_size=6), st.text(max_size=6))
def test_a_reference_to_an_existing_path_resolves_to_the_value_there(
    node_id: str, found: tuple[Any, list[str], Any], before: str, after: str
) -> None:
    output, path, value = found
    ref = "${" + node_id + "".join(f".{seg}" for seg in path) + "}"
    outputs = {node_id: output}
    assert resolve({"x": ref}, outputs) == {"x": value}
    assert resolve(f"${node_id}", outputs) == output
    assume((before or after) and "${" not in before + after)
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    assert resolve(before + ref + after, outputs) == before + text + after


@given(reference_texts | st.text(max_size=12), outputs_maps)
@example("$n1\n", {"n1": 5})  # "$" in a regex also matches before a final newline
def test_only_a_whole_reference_is_replaced_by_a_non_string(text: str, outputs: dict) -> None:
    try:
        resolved = resolve(text, outputs)
    except InvalidArgument:
        return
    if not isinstance(resolved, str):
        assert is_whole_reference(text)


@given(st.dictionaries(json_keys, reference_texts, max_size=3))
def test_every_unresolvable_reference_is_refused(args: dict) -> None:
    refs = referenced_nodes(args)
    assume(refs)
    try:
        resolve(args, {})
    except InvalidArgument as error:
        assert error.reason in RESOLVE_CODES
    else:
        raise AssertionError(f"{args} resolved with no outputs at all")
