"""Conversions between protobuf well-known types and plain Python values.

Reading a Value or Struct walks the message directly (one node's args and output are
read on every hop): the same result as ``json_format.MessageToDict`` plus integers
restored, without its JSON printer; a non-finite number, which JSON cannot hold, is left
to ``json_format`` (which refuses it as before).
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

_MAX_SAFE_INT = 2**53


def _restore_ints(value: Any) -> Any:
    # Struct stores every number as a double; give JSON integers back as int.
    if isinstance(value, float) and value.is_integer() and abs(value) < _MAX_SAFE_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _restore_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_ints(v) for v in value]
    return value


def to_value(obj: Any) -> struct_pb2.Value:
    """Any JSON-compatible Python object as a protobuf Value."""
    return json_format.ParseDict(obj, struct_pb2.Value())


def from_value(value: struct_pb2.Value) -> Any:
    """A protobuf Value as a plain Python object (None when unset)."""
    if value.WhichOneof("kind") is None:
        return None
    try:
        return _plain(value)
    except _NotFinite:
        return _restore_ints(json_format.MessageToDict(value))


class _NotFinite(Exception):
    """A number JSON cannot hold: ``json_format`` decides what becomes of it."""


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise _NotFinite
        if number.is_integer() and abs(number) < _MAX_SAFE_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: _plain(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None  # null_value (and an unset Value inside a list or struct)


def to_struct(obj: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if obj:
        struct.update(obj)
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    try:
        return {key: _plain(item) for key, item in struct.fields.items()}
    except _NotFinite:
        return _restore_ints(json_format.MessageToDict(struct))


def seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def duration(secs: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(secs * 1e9))
    return d


def timestamp(when: datetime | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if when is None:
        ts.FromNanoseconds(time.time_ns())  # now, without building a datetime
    else:
        ts.FromDatetime(when)
    return ts


def timestamp_seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9
