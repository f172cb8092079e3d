"""Error mapping both ways: domain exception -> status with details -> same exception."""

from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2

from trellis.runtime import errors, redact


class FakeRpcError(grpc.RpcError):
    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def test_round_trip_keeps_code_reason_metadata_and_violations() -> None:
    original = errors.InvalidArgument(
        "bad args",
        reason="ARGS_INVALID",
        violations=[errors.FieldViolation("args.x", "must be a number")],
        metadata={"tool": "arithmetic"},
    )
    status = errors.to_status(original)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    back = errors.from_rpc_error(FakeRpcError(status))
    assert isinstance(back, errors.InvalidArgument)
    assert (back.reason, back.message, back.metadata) == (
        "ARGS_INVALID",
        "bad args",
        {"tool": "arithmetic"},
    )
    assert back.violations == (errors.FieldViolation("args.x", "must be a number"),)


def test_status_carries_standard_google_rpc_details() -> None:
    status = errors.to_status(errors.NotFound("no such tool", reason="UNKNOWN_TOOL"))
    rich = errors.rich_status(FakeRpcError(status))
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("UNKNOWN_TOOL", errors.DOMAIN)


def test_plain_grpc_error_maps_by_code() -> None:
    # A status without rich details (e.g. from a non-Trellis server) maps by its code alone.
    plain = FakeRpcError(
        SimpleNamespace(code=grpc.StatusCode.UNAVAILABLE, details="down", trailing_metadata=())
    )
    error = errors.from_rpc_error(plain)
    assert isinstance(error, errors.Unavailable)
    assert (error.reason, error.message, error.retryable) == ("UNAVAILABLE", "down", True)


def test_translated_rpc_errors_raises_domain_exception() -> None:
    status = errors.to_status(errors.ResourceExhausted("slow down", reason="BUDGET_EXCEEDED"))
    with pytest.raises(errors.ResourceExhausted) as raised, errors.translated_rpc_errors():
        raise FakeRpcError(status)
    assert raised.value.reason == "BUDGET_EXCEEDED"


def _trailer_bytes(status: grpc.Status) -> int:
    return sum(len(key) + len(value) for key, value in status.trailing_metadata)


def test_quote_gives_a_short_escaped_prefix() -> None:
    assert errors.quote("run-1") == "'run-1'"
    assert errors.quote("a\x00b") == "'a\\x00b'"  # never a raw control character
    assert errors.quote("x" * 60_000) == "'" + "x" * 32 + "'…"


def test_a_huge_error_is_bounded_to_well_under_the_metadata_limit() -> None:
    """gRPC clients drop trailers over 8 KiB (RESOURCE_EXHAUSTED instead of the error):
    whatever an error echoes, its status stays small and keeps code and reason."""
    value = "é" * 60_000
    huge = errors.InvalidArgument(
        f"no run {value}",
        reason="INVALID_ID",
        metadata={f"key{i}-{value}": value for i in range(100)},
        violations=[errors.FieldViolation(f"plan[{i}].{value}", value) for i in range(5000)],
        retry_delay=1.5,
    )
    status = errors.to_status(huge)
    assert _trailer_bytes(status) < 8 * 1024
    back = errors.from_rpc_error(FakeRpcError(status))
    assert (back.code, back.reason, back.retry_delay) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ID",
        1.5,
    )
    assert back.message.startswith("no run éé") and "more violations not listed" in back.message
    assert len(back.message.encode()) <= errors.MAX_MESSAGE_BYTES + 64
    assert 0 < len(back.violations) < 5000
    assert all(len(v.field.encode()) <= errors.MAX_FIELD_BYTES for v in back.violations)
    assert len(back.metadata) <= errors.MAX_METADATA_ENTRIES


def test_a_small_error_is_sent_whole() -> None:
    error = errors.InvalidArgument(
        "bad", violations=[errors.FieldViolation(f"f{i}", "d") for i in range(20)]
    )
    back = errors.from_rpc_error(FakeRpcError(errors.to_status(error)))
    assert back.message == "bad" and len(back.violations) == 20


def test_quote_redacts_a_secret_before_it_cuts_it() -> None:
    secret = "SENTINEL" + "0123456789abcdef" * 3
    redact.register_secret(secret)
    quoted = errors.quote(f"name {secret} and more")
    assert secret[:20] not in quoted and redact.REDACTED in quoted
