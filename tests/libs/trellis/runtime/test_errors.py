"""Error mapping both ways: domain exception -> status with details -> same exception."""

from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2

from trellis.runtime import errors


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
