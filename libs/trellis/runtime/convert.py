"""Conversions between protobuf well-known types and plain Python values."""

from __future__ import annotations

from datetime import UTC, datetime
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
    return _restore_ints(json_format.MessageToDict(value))


def to_struct(obj: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if obj:
        struct.update(obj)
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return _restore_ints(json_format.MessageToDict(struct))


def seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def duration(secs: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(secs * 1e9))
    return d


def timestamp(when: datetime | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when or datetime.now(UTC))
    return ts


def timestamp_seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9
