"""Interceptors that apply the runtime's rules to every RPC.

Server side: each handler runs inside a request scope (incoming deadline and tenant),
the tenant is set on the RPC's server span (``trellis.tenant_id``), and
``TrellisError`` becomes a rich gRPC status; anything unexpected becomes INTERNAL
without leaking internals; with a tracer, each call's server span is opened here too.
Client side (``propagate``, applied by ``trellis.runtime.client_interceptors``): every
call's timeout is shortened to the incoming deadline and the tenant is forwarded as
metadata.

Where the tenant comes from: with ``api_keys`` (the executor, auth on), the methods of
the ``protected`` services need ``authorization: Bearer <key>`` and run as the key's
tenant; a client's own ``x-tenant-id`` is ignored (a client never picks its tenant).
Otherwise the tenant is the caller's ``x-tenant-id``: inside the mesh the callers are
Trellis services forwarding the tenant the executor authenticated, and mTLS
(``trellis.runtime.tls``) keeps anyone else from calling. An ``x-tenant-id`` that breaks
the tenant rule (``trellis.runtime.validation.TENANT_ID``) is INVALID_ARGUMENT.

Requests that do not decode (corrupt bytes, invalid UTF-8 in a string field, nesting
past protobuf's depth limit) are INVALID_ARGUMENT with reason ``MALFORMED_REQUEST`` for
every method of every service: each handler's request deserializer is wrapped here, and
the handler refuses the request it could not parse (gRPC itself would answer UNKNOWN).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace

from trellis.runtime import context
from trellis.runtime.auth import AUTHORIZATION_METADATA_KEY, ApiKeys
from trellis.runtime.errors import (
    DeadlineExceeded,
    FieldViolation,
    Internal,
    InvalidArgument,
    TrellisError,
    to_status,
)
from trellis.runtime.metrics import RPC_ERRORS
from trellis.runtime.rpc_spans import ServerCall, rpc_method, server_span
from trellis.runtime.validation import SESSION_ID, TENANT_ID

log = logging.getLogger(__name__)

#: Span attribute of the tenant a request acts for (the same name on every span).
ATTR_TENANT = "trellis.tenant_id"

#: A handler's own error is an answer, not a lost request: tell the client's retry
#: policy (which retries UNAVAILABLE for connection failures) not to repeat the call.
#: Without it a dependency outage is amplified by every hop's retries.
_NO_RETRY = (("grpc-retry-pushback-ms", "-1"),)


async def _abort(
    ctx: aio.ServicerContext, error: TrellisError, method: str, call: ServerCall
) -> None:
    RPC_ERRORS.labels(method=method, code=error.code.name, reason=error.reason).inc()
    status = to_status(error)
    call.failed(status.code, status.details)
    await ctx.abort(
        status.code, status.details, trailing_metadata=(*status.trailing_metadata, *_NO_RETRY)
    )


def _metadata_value(ctx: aio.ServicerContext, key: str) -> str | None:
    for item in ctx.invocation_metadata() or ():
        if item.key == key:
            return item.value if isinstance(item.value, str) else item.value.decode()
    return None


class _Malformed:
    """What the wrapped deserializer gives for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize`` that returns ``_Malformed`` instead of raising, so the handler
    (not gRPC, which answers UNKNOWN) refuses the request."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # DecodeError, or whatever a parser raises on bad bytes
            return _Malformed(error)

    return parse


def _malformed(method: str, request: _Malformed) -> InvalidArgument:
    error = request.error
    return InvalidArgument(
        f"{method}: the request is not a valid protobuf message ({type(error).__name__}: {error})",
        reason="MALFORMED_REQUEST",
        metadata={"method": method},
    )


async def _checked(method: str, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that raises ``MALFORMED_REQUEST`` at the first bad message."""
    async for request in requests:
        if isinstance(request, _Malformed):
            raise _malformed(method, request)
        yield request


def _request_tenant(ctx: aio.ServicerContext) -> str | None:
    """The caller's ``x-tenant-id``; ``InvalidArgument`` when it breaks the tenant rule."""
    tenant_id = _metadata_value(ctx, context.TENANT_METADATA_KEY)
    if tenant_id and (problem := TENANT_ID.problem(tenant_id)) is not None:
        raise InvalidArgument(
            f"metadata {context.TENANT_METADATA_KEY}: {problem}",
            reason="INVALID_ID",
            violations=[FieldViolation(context.TENANT_METADATA_KEY, problem)],
        )
    return tenant_id


def _scope(ctx: aio.ServicerContext, method: str, api_keys: ApiKeys | None):
    """The call's request scope; ``Unauthenticated`` when ``api_keys`` rejects it,
    ``InvalidArgument`` for an ``x-tenant-id`` that is not a tenant id."""
    if api_keys is None:
        tenant_id = _request_tenant(ctx)
    else:
        try:
            tenant_id = api_keys.authenticate(_metadata_value(ctx, AUTHORIZATION_METADATA_KEY))
        except TrellisError as error:
            log.info(
                "unauthenticated call refused: %s %s from %s", method, error.reason, ctx.peer()
            )
            raise
    # The current span is this RPC's server span (``server_span``).
    trace.get_current_span().set_attribute(ATTR_TENANT, tenant_id or context.tenant())
    session_id = _request_session(ctx)
    return context.request_scope(
        timeout=ctx.time_remaining(), tenant_id=tenant_id, session_id=session_id
    )


def _request_session(ctx: aio.ServicerContext) -> str | None:
    """The ``x-trellis-session-id`` a caller forwarded (the ledger labels usage with it)."""
    session_id = _metadata_value(ctx, context.SESSION_METADATA_KEY)
    if session_id and (problem := SESSION_ID.problem(session_id)) is not None:
        raise InvalidArgument(
            f"metadata {context.SESSION_METADATA_KEY}: {problem}",
            reason="INVALID_ID",
            violations=[FieldViolation(context.SESSION_METADATA_KEY, problem)],
        )
    return session_id or None


async def _fail(ctx: aio.ServicerContext, method: str, exc: Exception, call: ServerCall) -> None:
    if isinstance(exc, TrellisError):
        await _abort(ctx, exc, method, call)
        return
    log.exception("unhandled error in %s", method)
    await _abort(ctx, Internal(f"internal error ({type(exc).__name__})"), method, call)


async def _entered_scope(  # type: ignore[no-untyped-def]
    ctx: aio.ServicerContext, method: str, api_keys: ApiKeys | None, call: ServerCall
):
    """The request's scope, or the call aborted (a refused key: UNAUTHENTICATED)."""
    try:
        return _scope(ctx, method, api_keys)
    except TrellisError as error:
        await _abort(ctx, error, method, call)  # raises AbortError
        raise


def _parsed(method: str, request: Any) -> Any:
    """The request, or ``MALFORMED_REQUEST`` when it did not decode (a request stream is
    checked message by message)."""
    if isinstance(request, _Malformed):
        raise _malformed(method, request)
    if hasattr(request, "__aiter__"):
        return _checked(method, request)
    return request


def _wrap_unary(
    method: str,
    behavior: Callable[..., Awaitable[Any]],
    api_keys: ApiKeys | None,
    tracer: trace.Tracer | None,
) -> Callable[..., Any]:
    rpc = rpc_method(method)

    async def handler(request: Any, ctx: aio.ServicerContext) -> Any:
        with server_span(tracer, rpc, ctx.invocation_metadata()) as call:
            with await _entered_scope(ctx, method, api_keys, call):
                try:
                    return await behavior(_parsed(method, request), ctx)
                except aio.AbortError:
                    raise
                except Exception as exc:
                    await _fail(ctx, method, exc, call)

    return handler


def _wrap_stream(
    method: str,
    behavior: Callable[..., Any],
    api_keys: ApiKeys | None,
    tracer: trace.Tracer | None,
) -> Callable[..., Any]:
    """Wrap a streaming handler of either style: an async generator, or a coroutine that
    sends with ``context.write`` (grpcio-health-checking's ``Watch``).

    The wrapper itself sends with ``context.write``: a send that fails because the caller
    is gone then fails here, in the call's own task and context, and the servicer's stream
    is closed at once (its cleanup, e.g. cancelling a run nobody follows, runs in the
    request's scope). An async-generator wrapper would be dropped by gRPC instead, and
    closed later by the event loop in a task and context of its own."""
    rpc = rpc_method(method)

    async def handler(request: Any, ctx: aio.ServicerContext) -> None:
        with server_span(tracer, rpc, ctx.invocation_metadata()) as call:
            with await _entered_scope(ctx, method, api_keys, call):
                try:
                    responses = behavior(_parsed(method, request), ctx)
                    if inspect.isawaitable(responses):
                        await responses
                        return
                    async with aclosing(responses):
                        async for item in responses:
                            if not await _sent(ctx, item):
                                return
                except aio.AbortError:
                    raise
                except Exception as exc:
                    await _fail(ctx, method, exc, call)

    return handler


async def _sent(ctx: aio.ServicerContext, message: Any) -> bool:
    """Send ``message``; False when the stream broke (gRPC's send failed: the caller is
    gone, nobody is left to answer)."""
    try:
        await ctx.write(message)
    except (aio.AbortError, asyncio.CancelledError):
        raise
    except Exception as error:
        log.info("stream ended: the caller is gone (%s)", type(error).__name__)
        return False
    return True


class ServerRulesInterceptor(aio.ServerInterceptor):
    """Request scope and error mapping for every handler of a server; with ``api_keys``,
    authentication of the methods of the ``protected`` services (full proto names); with
    ``tracer``, each call's server span (``trellis.runtime.rpc_spans``).

    One interceptor does all of it: the span is opened in the same wrapper that maps
    errors, so the status is put on it directly (no servicer-context proxy per call),
    and a server runs one interceptor per call rather than two.
    """

    def __init__(
        self,
        api_keys: ApiKeys | None = None,
        protected: Iterable[str] = (),
        *,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._api_keys = api_keys
        self._tracer = tracer
        self._protected = tuple(f"/{name}/" for name in protected)
        # Wrapped handlers are built once per method, not per call (hot path).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            keys = self._api_keys if method.startswith(self._protected) else None
            cached = (handler, _wrap(method, handler, keys, self._tracer))
            self._wrapped[method] = cached
        return cached[1]


def _wrap(
    method: str,
    handler: grpc.RpcMethodHandler,
    api_keys: ApiKeys | None,
    tracer: trace.Tracer | None,
) -> grpc.RpcMethodHandler:
    kwargs = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(method, handler.unary_unary, api_keys, tracer), **kwargs
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(method, handler.unary_stream, api_keys, tracer), **kwargs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(method, handler.stream_unary, api_keys, tracer), **kwargs
        )
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(method, handler.stream_stream, api_keys, tracer), **kwargs
    )


def propagate(details: aio.ClientCallDetails) -> aio.ClientCallDetails:
    """``details`` with the timeout cut to the incoming deadline and the tenant added
    (``trellis.runtime.client_interceptors`` applies it to every call)."""
    left = context.remaining()
    timeout = details.timeout
    if left is not None:
        if left <= 0:
            raise DeadlineExceeded(f"deadline expired before calling {details.method}")
        timeout = left if timeout is None else min(timeout, left)
    metadata = aio.Metadata(*(details.metadata or ()))
    if context.TENANT_METADATA_KEY not in metadata:
        metadata.add(context.TENANT_METADATA_KEY, context.tenant())
    if context.session() and context.SESSION_METADATA_KEY not in metadata:
        metadata.add(context.SESSION_METADATA_KEY, context.session())
    return details._replace(timeout=timeout, metadata=metadata)
