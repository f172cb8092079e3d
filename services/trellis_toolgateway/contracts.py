"""A call's input contract: arguments checked against the tool's input JSON Schema.

Violations become ``InvalidArgument(ARGS_INVALID)`` with one google.rpc BadRequest field
violation per problem, named like ``args.items[2].name``, before any backend runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jsonschema import ValidationError

from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis_toolgateway.registry import Entry
from trellis_toolgateway.tools.base import Json


def _field(path: Sequence[str | int]) -> str:
    """``["items", 2, "name"]`` -> ``args.items[2].name`` (google.rpc BadRequest style)."""
    out = "args"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _violations(errors: Sequence[ValidationError]) -> list[FieldViolation]:
    """One violation per problem; a missing property is reported on the property itself."""
    violations: list[FieldViolation] = []
    seen: set[tuple[str, str]] = set()
    for error in errors:
        path = list(error.absolute_path)
        items = [(_field(path), error.message)]
        if error.validator == "required" and isinstance(error.instance, Mapping):
            items = [
                (_field([*path, name]), f"{name!r} is a required property")
                for name in error.validator_value
                if name not in error.instance
            ]
        for item in items:
            if item not in seen:
                seen.add(item)
                violations.append(FieldViolation(*item))
    return violations


def validate_args(entry: Entry, args: dict[str, Json]) -> None:
    """Raise ``InvalidArgument(ARGS_INVALID)`` unless ``args`` match the input schema."""
    errors = sorted(
        entry.args_validator.iter_errors(args), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        name = entry.tool.spec.name
        raise InvalidArgument(
            f"arguments of {name!r} do not match its input schema: {errors[0].message}",
            reason="ARGS_INVALID",
            violations=_violations(errors),
            metadata={"tool": name},
        )
