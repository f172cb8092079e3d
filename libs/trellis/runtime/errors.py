"""Domain errors and their mapping to and from gRPC status codes.

Core code raises a ``TrellisError`` subclass with a stable ``reason`` (UPPER_SNAKE_CASE);
the server interceptor turns it into a gRPC status carrying ``google.rpc.ErrorInfo``
(and ``BadRequest`` field violations for contract failures, ``RetryInfo`` when the
error says how long to wait before trying again). Clients turn an
``AioRpcError`` back into the same exception with ``from_rpc_error``. This module is the
only place that knows about both sides.

What an error echoes of a caller's input is bounded twice: messages quote a value with
``quote`` (a short prefix), and ``to_status`` caps the message, every metadata value and
violation, and the whole status, so no error's trailers come near gRPC's metadata limit
(8 KiB by default: a client drops a status whose trailers are larger, and sees
RESOURCE_EXHAUSTED instead of the error).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from trellis.runtime.redact import redact_details, redact_text

DOMAIN = "trellis.dev"
_DETAILS_KEY = "grpc-status-details-bin"

#: Characters of a caller's value an error message quotes (``quote``).
QUOTE_CHARS = 32
#: Bounds ``to_status`` applies (UTF-8 bytes): the message (sent twice, in grpc-message
#: percent-encoded and inside the details), each ErrorInfo metadata key and value, each
#: violation's field and description, and the whole serialized google.rpc.Status.
MAX_MESSAGE_BYTES = 512
MAX_METADATA_KEY_BYTES = 64
MAX_METADATA_VALUE_BYTES = 128
MAX_METADATA_ENTRIES = 8
MAX_FIELD_BYTES = 128
MAX_DESCRIPTION_BYTES = 256
MAX_STATUS_BYTES = 4096
#: Violations considered at most (the rest are counted in the message).
MAX_VIOLATIONS = 32
_ELLIPSIS = "…"


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``value`` for an error message: the ``repr`` of at most ``limit`` characters, ``…``
    after a cut. Control characters come out escaped (``'\\x00'``), never raw. Secrets
    are redacted before the cut: a secret's prefix would no longer be recognised."""
    text = redact_text(str(value))
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + _ELLIPSIS


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes (``…`` included when cut)."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    room = max_bytes - len(_ELLIPSIS.encode())
    return data[:room].decode(errors="ignore") + _ELLIPSIS


@dataclass(frozen=True)
class FieldViolation:
    """One field of a request that broke its contract."""

    field: str
    description: str


class TrellisError(Exception):
    """Base of all errors that cross a service boundary."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        #: Seconds the caller should wait before retrying (``google.rpc.RetryInfo``).
        self.retry_delay = retry_delay

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason}: {self.message})"


class InvalidArgument(TrellisError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(TrellisError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(TrellisError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(TrellisError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(TrellisError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(TrellisError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(TrellisError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"
    retryable = True


class DeadlineExceeded(TrellisError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(TrellisError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class Unavailable(TrellisError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"
    retryable = True


class Unimplemented(TrellisError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(TrellisError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[TrellisError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Unavailable,
        Unimplemented,
        Internal,
    )
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: TrellisError) -> grpc.Status:
    """The gRPC status (code, message, rich details in trailers) for ``error``.

    Message, metadata and violations are redacted (``trellis.runtime.redact``): a secret
    that found its way into an error (a model endpoint quoting the API key, a tool
    quoting its arguments) never leaves the server. They are also bounded (see the
    module docstring): violations that do not fit in ``MAX_STATUS_BYTES`` are left out
    and counted in the message.
    """
    metadata = {
        clip(key, MAX_METADATA_KEY_BYTES): clip(value, MAX_METADATA_VALUE_BYTES)
        for key, value in list(redact_details(error.metadata).items())[:MAX_METADATA_ENTRIES]
    }
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=clip(redact_text(v.field), MAX_FIELD_BYTES),
            description=clip(redact_text(v.description), MAX_DESCRIPTION_BYTES),
        )
        for v in error.violations[:MAX_VIOLATIONS]
    ]
    message = clip(redact_text(error.message), MAX_MESSAGE_BYTES)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    retry = None
    if error.retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(error.retry_delay * 1e9)))
        retry = error_details_pb2.RetryInfo(retry_delay=delay)
    kept, total = len(violations), len(error.violations)
    while True:
        status = _status(error.code, message, info, violations[:kept], retry, total)
        if status.ByteSize() <= MAX_STATUS_BYTES or kept == 0:
            break
        kept -= 1
    if status.ByteSize() > MAX_STATUS_BYTES:  # only metadata is left to shed
        info.ClearField("metadata")
        status = _status(error.code, message, info, [], retry, total)
    return rpc_status.to_status(status)


def _status(
    code: grpc.StatusCode,
    message: str,
    info: error_details_pb2.ErrorInfo,
    violations: list[error_details_pb2.BadRequest.FieldViolation],
    retry: error_details_pb2.RetryInfo | None,
    total: int,
) -> status_pb2.Status:
    details = [_pack(info)]
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if retry is not None:
        details.append(_pack(retry))
    if len(violations) < total:
        message += f" ({total - len(violations)} more violations not listed)"
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status carried in an RPC error's trailers, if any."""
    trailers = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    for key, value in trailers:
        if key == _DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def from_rpc_error(error: grpc.RpcError) -> TrellisError:
    """Rebuild the domain exception a peer raised, reason and violations included."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or code.name  # type: ignore[attr-defined]
    reason, metadata, violations = code.name, {}, []
    retry_delay: float | None = None
    status = rich_status(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_delay = info.retry_delay.ToNanoseconds() / 1e9
    cls = _BY_CODE.get(code, Internal)
    return cls(
        message, reason=reason, violations=violations, metadata=metadata, retry_delay=retry_delay
    )


def is_retryable_code(code: grpc.StatusCode) -> bool:
    """Codes worth retrying (docs/architecture.md, "Retries"): never INVALID_ARGUMENT
    and friends."""
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@contextmanager
def translated_rpc_errors() -> Iterator[None]:
    """Around a client call: a peer's ``RpcError`` re-raised as the domain exception."""
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from error


__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TrellisError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "clip",
    "from_rpc_error",
    "is_retryable_code",
    "quote",
    "rich_status",
    "to_status",
    "translated_rpc_errors",
]
