"""Reading Values and Structs directly gives what ``json_format`` gave (integers
restored), and a non-finite number is still refused."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from google.protobuf import json_format, struct_pb2

from trellis.runtime.convert import (
    _restore_ints,
    from_struct,
    from_value,
    timestamp,
    timestamp_seconds,
    to_struct,
    to_value,
)

CASES = [
    {},
    {"n": None, "t": True, "f": False, "s": "", "u": "ünï"},
    {"int": 3, "neg": -7, "half": 2.5, "zero": -0.0, "big": 2**60, "huge": 1e300},
    {"list": [1, [2, [3, {"deep": []}]], None, "x"], "obj": {"a": {"b": {}}}},
]


@pytest.mark.parametrize("obj", CASES)
def test_structs_and_values_read_as_json_format_did(obj: dict) -> None:
    struct = to_struct(obj)
    assert from_struct(struct) == _restore_ints(json_format.MessageToDict(struct))
    value = to_value(obj)
    assert from_value(value) == _restore_ints(json_format.MessageToDict(value))
    assert from_struct(struct) == obj  # a JSON round trip, integers kept as int
    assert type(from_struct(to_struct({"i": 3}))["i"]) is int


def test_scalars_unset_and_empty_values() -> None:
    for obj in (1, 2.5, "s", True, [], [None]):
        assert from_value(to_value(obj)) == obj
    assert from_value(struct_pb2.Value()) is None
    unset_in_list = struct_pb2.Value()
    unset_in_list.list_value.values.add()
    assert from_value(unset_in_list) == [None]


def test_a_non_finite_number_is_refused_as_before() -> None:
    for number in (math.nan, math.inf):
        with pytest.raises(ValueError):
            from_value(struct_pb2.Value(number_value=number))
        struct = struct_pb2.Struct()
        struct.fields["x"].number_value = number
        with pytest.raises(ValueError):
            from_struct(struct)


def test_timestamp_is_now_or_the_given_moment() -> None:
    before = datetime.now(UTC).timestamp()
    now = timestamp_seconds(timestamp())
    assert before <= now <= datetime.now(UTC).timestamp()
    moment = datetime(2025, 3, 15, 12, 0, 0, 123456, tzinfo=UTC)
    assert timestamp(moment).ToDatetime(tzinfo=UTC) == moment
