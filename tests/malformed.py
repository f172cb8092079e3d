"""Request bytes no protobuf message decodes from, built by hand (a client library
would refuse to build them): what a broken or hostile client sends on a raw channel."""

from __future__ import annotations

#: Not a protobuf message at all: a field tag with wire type 7 (there is none).
CORRUPT = b"\xff\xff\xff\xff\x0f"
#: A truncated message: field 1 says 100 bytes follow, 2 do.
TRUNCATED = b"\x0a\x64ab"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message) ``number`` holding ``payload``."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def invalid_utf8(number: int) -> bytes:
    """A message whose string field ``number`` is not UTF-8."""
    return field(number, b"ok \xff\xfe not utf-8")


def deep_struct(depth: int) -> bytes:
    """A google.protobuf.Struct ``{"k": {"k": ... {}}}`` nested ``depth`` levels."""
    struct = b""
    for _ in range(depth):
        value = field(5, struct)  # Value.struct_value
        entry = field(1, b"k") + field(2, value)  # Struct.FieldsEntry
        struct = field(1, entry)  # Struct.fields
    return struct
