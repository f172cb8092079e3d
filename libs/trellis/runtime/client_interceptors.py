"""The client side of every RPC, one interceptor per call type: the incoming deadline
and tenant carried on, the call's span (``trellis.runtime.rpc_spans``) and the trace
context in its metadata.

One interceptor, not a tracing one followed by a propagating one: grpc.aio runs every
interceptor layer of a call as a task of its own with an intercepted-call wrapper, so
each layer costs on every hop. A unary call's span ends with the call, and also when
its caller is cancelled (a run's deadline, CancelRun, a client gone): the RPC is then
cancelled too and the span ends CANCELLED, rather than a span left open forever with
its server-side children orphaned and the RPC running on for nobody
(opentelemetry-python-contrib#3271, which the instrumentation used before this had).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind

from trellis.runtime.interceptors import propagate
from trellis.runtime.rpc_spans import (
    RpcKind,
    RpcMethod,
    end_with_status,
    now_ns,
    record_failure,
    rpc_method,
    start_client_span,
)

_CANCELLED = "the caller was cancelled"


class _Call:
    """One call's tracing: its span (traced methods) or its start (bookkeeping ones)."""

    __slots__ = ("_done", "_tracer", "method", "span", "start_ns")

    def __init__(self, tracer: trace.Tracer, method: RpcMethod) -> None:
        self._tracer, self.method, self._done = tracer, method, False
        self.span: trace.Span | None = None
        self.start_ns = 0
        if method.kind is RpcKind.TRACED:
            self.span = start_client_span(tracer, method)
        else:
            self.start_ns = now_ns()

    def inject(self, metadata: aio.Metadata) -> None:
        """The trace context for the server: this call's span, or (bookkeeping) the
        caller's, so that a failing server's span still lands in the trace."""
        context = None if self.span is None else trace.set_span_in_context(self.span)
        inject(metadata, context=context)

    def ended(self, code: grpc.StatusCode, details: str | None) -> None:
        if self._done:
            return
        self._done = True
        if self.span is not None:
            end_with_status(self.span, code, details)
        elif code != grpc.StatusCode.OK:
            record_failure(self._tracer, self.method, SpanKind.CLIENT, self.start_ns, code, details)


class _Interceptor:
    def __init__(self, tracer: trace.Tracer | None) -> None:
        self._tracer = tracer

    def _start(self, details: aio.ClientCallDetails) -> tuple[aio.ClientCallDetails, _Call | None]:
        details = propagate(details)
        if self._tracer is None:
            return details, None
        method = rpc_method(details.method)
        if method.kind is RpcKind.UNTRACED:
            return details, None
        call = _Call(self._tracer, method)
        call.inject(details.metadata)
        return details, call


async def _unary(traced: _Call, started: Callable[[], Awaitable[aio.Call]]) -> aio.Call:
    """The call, once its status is known (so its span ends with it)."""
    call: aio.Call | None = None
    try:
        call = await started()
        code = await call.code()
        details = await call.details() if code != grpc.StatusCode.OK else None
    except asyncio.CancelledError:
        if call is not None:
            call.cancel()
        traced.ended(grpc.StatusCode.CANCELLED, _CANCELLED)
        raise
    except aio.AioRpcError as error:
        traced.ended(error.code(), error.details())
        raise
    except BaseException as error:
        traced.ended(grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}")
        raise
    traced.ended(code, details)
    return call


async def _stream(traced: _Call, call: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The call's responses; its span ends when they do (or the reader stops)."""
    try:
        async for response in call:
            yield response
    except aio.AioRpcError as error:
        traced.ended(error.code(), error.details())
        raise
    except asyncio.CancelledError:
        traced.ended(grpc.StatusCode.CANCELLED, _CANCELLED)
        raise
    except Exception as error:
        traced.ended(grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}")
        raise
    finally:
        traced.ended(grpc.StatusCode.OK, None)  # no-op when it ended above
        # A reader that stopped early closes this generator: the RPC is done with.
        cancel = getattr(call, "cancel", None)
        if cancel is not None:
            cancel()


class UnaryUnary(_Interceptor, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        details, traced = self._start(client_call_details)
        if traced is None:
            return await continuation(details, request)
        return await _unary(traced, lambda: continuation(details, request))


class StreamUnary(_Interceptor, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        details, traced = self._start(client_call_details)
        if traced is None:
            return await continuation(details, request_iterator)
        return await _unary(traced, lambda: continuation(details, request_iterator))


class UnaryStream(_Interceptor, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        details, traced = self._start(client_call_details)
        call = await continuation(details, request)
        return call if traced is None else _stream(traced, call)


class StreamStream(_Interceptor, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        details, traced = self._start(client_call_details)
        call = await continuation(details, request_iterator)
        return call if traced is None else _stream(traced, call)


def client_interceptors(tracer: trace.Tracer | None = None) -> list[aio.ClientInterceptor]:
    """Propagation, and with ``tracer`` the call's span, for every call type."""
    return [cls(tracer) for cls in (UnaryUnary, UnaryStream, StreamUnary, StreamStream)]
