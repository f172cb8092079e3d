"""One MCP session, owned by one asyncio task for its whole life.

Why one owner task: the SDK's transports and ``ClientSession`` are anyio context managers
built on task groups and cancel scopes, which must be entered and exited by the same task.
The gateway, however, calls tools from whichever request task runs the call, and a
session outlives all of them. So ``McpConnection`` runs one dedicated asyncio task that
enters the transport and the session, then serves requests taken from a queue, each in
its own child task of its task group (in the caller's contextvars, so tracing and
deadlines follow the call). Callers wait on a future; a caller that gives up (timeout,
cancellation) cancels its request's scope, and the owner cancels or fails everything
still pending when the connection ends.

Knowing that a session ended matters for what may be sent again: the read stream is
watched, so a server that exits (or closes the stream) marks the connection dead at once,
before any later request is sent. A request that finds the connection dead raises
``NotSent`` (nothing reached the server: any tool may be sent again on a new session);
one that was in flight when it ended fails ``MCP_UNAVAILABLE`` (it may have run).
``on_end`` tells the owner of the connection that the server went away.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import mcp.types as mcp_types
from mcp import ClientSession, MCPError

from trellis.runtime.logs import get_logger
from trellis_toolgateway.tools.base import ToolError

log = get_logger(__name__)

T = TypeVar("T")
Session = ClientSession
Transport = Callable[[], AbstractAsyncContextManager[Any]]
#: Receives the server's notifications (``tools/list_changed``, ...) and transport errors.
MessageHandler = Callable[[Any], Awaitable[None]]

#: On close, how long calls in flight may still finish before they are cancelled.
CLOSE_GRACE = 2.0
#: Longest wait for the owner task to shut the transport down (stdio: stop the process).
CLOSE_TIMEOUT = 10.0

UNAVAILABLE = "MCP_UNAVAILABLE"

_CLIENT_INFO = mcp_types.Implementation(name="trellis-toolgateway", version="1")


class NotSent(Exception):
    """The connection was already gone: the request never reached the server."""


def unavailable(server: str, message: str) -> ToolError:
    return ToolError(
        UNAVAILABLE, f"MCP server {server!r}: {message}", retryable=True, details={"server": server}
    )


def describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup) and error.exceptions:
        return describe(error.exceptions[0])
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def session_expired(error: MCPError) -> bool:
    """A streamable-HTTP server refused a request for want of our session: it restarted or
    expired it ("Session not found"; the SDK's "Session terminated" for a 404). The request
    was refused before any tool ran, so it is safe to send again on a new session."""
    return error.code == mcp_types.INVALID_REQUEST and "session" in error.message.lower()


def session_lost(error: MCPError) -> bool:
    """Whether an MCP error means the session is gone, not that one request failed.

    CONNECTION_CLOSED: the transport ended (stdio server exited, stream closed) while the
    request was out; whether the tool ran is unknown.
    """
    return error.code == mcp_types.CONNECTION_CLOSED or session_expired(error)


class _EndWatch:
    """The transport's read stream, calling ``on_end`` when it ends (the server is gone).

    Everything else is the wrapped stream's: the dispatcher reads it as before.
    """

    def __init__(self, inner: Any, on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    def __aiter__(self) -> _EndWatch:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _EndWatch:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._inner.__aexit__(*exc_info)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass(eq=False)
class _Request:
    """One piece of work for the owner task and the future its caller waits on."""

    fn: Callable[[Session], Awaitable[Any]]
    future: asyncio.Future[Any]
    context: contextvars.Context
    scope: anyio.CancelScope | None = field(default=None)

    def abandoned(self, future: asyncio.Future[Any]) -> None:
        # Done-callback: the caller was cancelled, so stop the work it no longer waits for.
        if future.cancelled() and self.scope is not None:
            self.scope.cancel()


class McpConnection:
    """One MCP session (see the module docstring)."""

    def __init__(
        self,
        transport: Transport,
        server: str,
        *,
        on_message: MessageHandler | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self._transport = transport
        self._server = server
        self._on_message = on_message
        self._on_end = on_end
        self._requests: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._alive = False
        self.closing = False
        #: What the server said it offers (``initialize``), once the session is up.
        self.capabilities: mcp_types.ServerCapabilities | None = None
        # A fresh context: the owner outlives the call that happened to start it, and must
        # not inherit that call's span or deadline.
        self.task = asyncio.create_task(
            self._own(), name=f"mcp:{server}", context=contextvars.Context()
        )

    @property
    def alive(self) -> bool:
        """True while the session is (or is becoming) usable."""
        return not self.task.done() and (self._alive or not self._ready.done())

    async def wait_ready(self, limit: float) -> None:
        """Wait for ``initialize`` to complete; ``MCP_UNAVAILABLE`` if it fails or is slow.

        A caller cancelled meanwhile leaves the connect running for the next call.
        """
        try:
            async with asyncio.timeout(limit):
                await asyncio.shield(self._ready)
        except TimeoutError:
            self.task.cancel()
            raise unavailable(self._server, f"no session within {limit:g}s") from None
        except ToolError:
            raise
        except Exception as error:
            raise unavailable(self._server, f"cannot connect: {describe(error)}") from error

    async def call(self, fn: Callable[[Session], Awaitable[T]]) -> T:
        """Run ``fn(session)`` in the owner task's group and return its result;
        ``NotSent`` if the session had already ended."""
        if not self._alive:
            raise NotSent
        loop = asyncio.get_running_loop()
        request = _Request(fn, loop.create_future(), contextvars.copy_context())
        request.future.add_done_callback(request.abandoned)
        self._requests.put_nowait(request)
        return await request.future

    def close_soon(self) -> None:
        """Stop taking calls and shut the session down in the background (idempotent)."""
        self._alive = False
        if not self.closing:
            self.closing = True
            self._requests.put_nowait(None)

    async def aclose(self, limit: float = CLOSE_TIMEOUT) -> None:
        self.close_soon()
        try:
            async with asyncio.timeout(limit):
                await asyncio.shield(self.task)
        except TimeoutError:
            self.task.cancel()
        with suppress(BaseException):
            await self.task

    def _ended(self) -> None:
        """The read stream ended: the server is gone (unless we are closing it)."""
        if not self._alive:
            return
        self._alive = False
        self._requests.put_nowait(None)  # the owner winds the session down
        if not self.closing and self._on_end is not None:
            log.warning("MCP server went away", server=self._server)
            self._on_end()

    async def _own(self) -> None:
        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(
                    ClientSession(
                        _EndWatch(read, self._ended),
                        write,
                        client_info=_CLIENT_INFO,
                        message_handler=self._on_message,
                    )
                )
                initialized = await session.initialize()
                self.capabilities = initialized.capabilities
                self._alive = not self.closing
                self._ready.set_result(None)
                try:
                    await self._serve_queue(session)
                finally:
                    self._retire()
        except Exception as error:  # the transport failed: the calls learn it from _retire
            if not self._ready.done():
                self._ready.set_exception(error)
            else:
                log.warning("MCP session ended", server=self._server, error=describe(error))
        finally:
            self._retire()
            if not self._ready.done():
                self._ready.set_exception(unavailable(self._server, "closed while connecting"))
            if not self._ready.cancelled():
                self._ready.exception()  # mark retrieved: a caller may have stopped waiting

    async def _serve_queue(self, session: Session) -> None:
        async with anyio.create_task_group() as group:
            while (request := await self._requests.get()) is not None:
                # Spawned inside the caller's context: its span parents the SDK's request span.
                request.context.run(group.start_soon, self._serve, session, request)
            # Closing: let calls in flight finish briefly, then cancel them.
            group.cancel_scope.deadline = anyio.current_time() + CLOSE_GRACE

    async def _serve(self, session: Session, request: _Request) -> None:
        if request.future.done():  # the caller gave up before the call started
            return
        if not self._alive:  # ended while the request waited: it was never sent
            request.future.set_exception(NotSent())
            return
        try:
            with anyio.CancelScope() as scope:
                request.scope = scope
                result = await request.fn(session)
                if not request.future.done():
                    request.future.set_result(result)
        except Exception as error:
            if not request.future.done():
                request.future.set_exception(error)
        finally:
            if not request.future.done():  # cancelled by the connection ending
                request.future.set_exception(
                    unavailable(self._server, "connection closed during the call")
                )

    def _retire(self) -> None:
        """No more calls: the ones still queued were never sent. Synchronous, so nothing
        slips in."""
        self._alive = False
        while not self._requests.empty():
            request = self._requests.get_nowait()
            if request is not None and not request.future.done():
                request.future.set_exception(NotSent())
