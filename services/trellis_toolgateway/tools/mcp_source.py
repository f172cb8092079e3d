"""The tools of one MCP server (stdio command or streamable-HTTP URL), served as gateway tools.

``McpSource(config)`` keeps one MCP session open for its lifetime: started lazily by the
first ``tools()`` or tool call, closed by ``aclose()``. Each MCP tool becomes a ``Tool``
named ``config.prefix + tool.name`` whose contract is the server's (description, input
schema, output schema or a permissive one) and whose execution policy (timeout, cache TTL,
side effects, concurrency, cost, retries, version) is the config's, since an MCP server
declares no such things.

Why one owner task: the SDK's transports and ``ClientSession`` are anyio context managers
built on task groups and cancel scopes, which must be entered and exited by the same task.
The gateway, however, calls tools from whichever request task runs the call, and a source
outlives all of them. So ``_Connection`` runs one dedicated asyncio task that enters the
transport and the session, then serves requests taken from a queue, each in its own child
task of its task group (in the caller's contextvars, so tracing and deadlines follow the
call). Callers wait on a future; a caller that gives up (timeout, cancellation) cancels
its request's scope, and the owner cancels or fails everything still pending when the
connection ends. A lost connection (the stdio server exited, the HTTP server went away or
forgot the session) fails the calls in flight with ``MCP_UNAVAILABLE`` (retryable), and
the next call opens a fresh session.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import mcp.types as mcp_types
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from pydantic import ValidationError

from trellis.runtime import context
from trellis.runtime.logs import get_logger
from trellis_toolgateway.tools.base import Json, Spec, Tool, ToolError, ToolSource
from trellis_toolgateway.tools.config import McpServer

log = get_logger(__name__)

T = TypeVar("T")
Session = ClientSession
Transport = Callable[[], AbstractAsyncContextManager[Any]]

#: Longest wait for a server to start and answer ``initialize``.
CONNECT_TIMEOUT = 30.0
#: On close, how long calls in flight may still finish before they are cancelled.
CLOSE_GRACE = 2.0
#: Longest wait for the owner task to shut the transport down (stdio: stop the process).
CLOSE_TIMEOUT = 10.0

#: The output contract of an MCP tool that declares no outputSchema: any JSON value.
PERMISSIVE_SCHEMA: dict[str, Json] = {}

UNAVAILABLE = "MCP_UNAVAILABLE"
TOOL_ERROR = "MCP_TOOL_ERROR"
PROTOCOL_ERROR = "MCP_PROTOCOL_ERROR"

_CLIENT_INFO = mcp_types.Implementation(name="trellis-toolgateway", version="1")


def _unavailable(server: str, message: str) -> ToolError:
    return ToolError(
        UNAVAILABLE, f"MCP server {server!r}: {message}", retryable=True, details={"server": server}
    )


def _session_expired(error: MCPError) -> bool:
    """A streamable-HTTP server refused a request for want of our session: it restarted or
    expired it ("Session not found"; the SDK's "Session terminated" for a 404). The request
    was refused before any tool ran, so it is safe to send again on a new session."""
    return error.code == mcp_types.INVALID_REQUEST and "session" in error.message.lower()


def _session_lost(error: MCPError) -> bool:
    """Whether an MCP error means the session is gone, not that one request failed.

    CONNECTION_CLOSED: the transport ended (stdio server exited, stream closed); whether
    the call ran is unknown, so it is not resent here (the invoker's retry policy decides).
    """
    return error.code == mcp_types.CONNECTION_CLOSED or _session_expired(error)


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


class _Connection:
    """One MCP session, owned by one asyncio task for its whole life (see module docstring)."""

    def __init__(self, transport: Transport, server: str) -> None:
        self._transport = transport
        self._server = server
        self._requests: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._alive = False
        self.closing = False
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
            raise _unavailable(self._server, f"no session within {limit:g}s") from None
        except ToolError:
            raise
        except Exception as error:
            raise _unavailable(self._server, f"cannot connect: {_describe(error)}") from error

    async def call(self, fn: Callable[[Session], Awaitable[T]]) -> T:
        """Run ``fn(session)`` in the owner task's group and return its result."""
        if not self._alive:
            raise _unavailable(self._server, "not connected")
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

    async def _own(self) -> None:
        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(
                    ClientSession(read, write, client_info=_CLIENT_INFO)
                )
                await session.initialize()
                self._alive = True
                self._ready.set_result(None)
                try:
                    await self._serve_queue(session)
                finally:
                    self._retire()
        except Exception as error:  # the transport failed: the calls learn it from _retire
            if not self._ready.done():
                self._ready.set_exception(error)
            else:
                log.warning("MCP session ended", server=self._server, error=_describe(error))
        finally:
            self._retire()
            if not self._ready.done():
                self._ready.set_exception(_unavailable(self._server, "closed while connecting"))
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
                    _unavailable(self._server, "connection closed during the call")
                )

    def _retire(self) -> None:
        """No more calls: fail the ones still queued. Synchronous, so nothing slips in."""
        self._alive = False
        while not self._requests.empty():
            request = self._requests.get_nowait()
            if request is not None and not request.future.done():
                request.future.set_exception(_unavailable(self._server, "connection closed"))


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup) and error.exceptions:
        return _describe(error.exceptions[0])
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def output_of(result: mcp_types.CallToolResult) -> Json:
    """The tool output as JSON: structured content if any, else the text content joined
    (or, when there is non-text content, every content item as its MCP JSON object)."""
    if result.structured_content is not None:
        return result.structured_content
    if all(isinstance(item, mcp_types.TextContent) for item in result.content):
        return "\n".join(item.text for item in result.content)  # type: ignore[union-attr]
    return [
        item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in result.content
    ]


def _error_text(result: mcp_types.CallToolResult) -> str:
    texts = [item.text for item in result.content if isinstance(item, mcp_types.TextContent)]
    return "\n".join(texts) or "the tool reported an error"


class McpTool(Tool):
    """One tool of an MCP server; ``run`` is a ``tools/call`` on the source's session."""

    def __init__(self, source: McpSource, spec: Spec, remote_name: str) -> None:
        self.spec = spec
        self.remote_name = remote_name
        self._source = source

    async def run(self, args: dict[str, Json]) -> Json:
        # The invoker bounds the call too; this bound also ends the request at the server.
        limit = context.call_timeout(self.spec.timeout)
        return await self._source.call_tool(self.remote_name, args, read_timeout=limit)


class McpSource(ToolSource):
    """The tools of the MCP server ``config`` declares, over one lazily opened session.

    ``tools()`` and tool calls raise ``ToolError(MCP_UNAVAILABLE, retryable=True)`` when
    the server cannot be reached or the session is lost; a later call reconnects.
    """

    def __init__(
        self,
        config: McpServer,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        cwd: str | Path | None = None,
    ) -> None:
        if config.command is not None and not config.command:
            raise ValueError(f"MCP server {config.name!r}: command is empty")
        self.config = config
        self._connect_timeout = connect_timeout
        self._cwd = cwd
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        if config.input_schema is not None or config.output_schema is not None:
            log.warning(
                "input_schema/output_schema of an MCP server are ignored: each tool has its own",
                server=config.name,
            )

    @property
    def name(self) -> str:
        return self.config.name

    def _transport(self) -> AbstractAsyncContextManager[Any]:
        if self.config.url is not None:
            return streamable_http_client(self.config.url)
        assert self.config.command is not None
        command, *args = self.config.command
        # stdio_client merges env over a minimal inherited one (HOME, PATH, USER, ...):
        # the gateway's secrets do not leak into the server unless the config passes them.
        params = StdioServerParameters(
            command=command, args=args, env=dict(self.config.env), cwd=self._cwd
        )
        return stdio_client(params)

    async def tools(self) -> list[Tool]:
        listed = await self._request(_list_all_tools)
        return [McpTool(self, self._spec(tool), tool.name) for tool in listed]

    async def call_tool(self, name: str, args: dict[str, Json], *, read_timeout: float) -> Json:
        """``tools/call`` of the server's tool ``name``; its output as JSON."""

        async def call(session: Session) -> mcp_types.CallToolResult:
            return await session.call_tool(name, args, read_timeout_seconds=read_timeout)

        result = await self._request(call)
        if result.is_error:
            raise ToolError(
                TOOL_ERROR, _error_text(result), details={"server": self.name, "tool": name}
            )
        return output_of(result)

    async def aclose(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()
        for task in list(self._retiring):
            with suppress(BaseException):
                await task

    def _spec(self, tool: mcp_types.Tool) -> Spec:
        c = self.config
        return Spec(
            name=f"{c.prefix}{tool.name}",
            description=tool.description or tool.title or c.description or tool.name,
            input_schema=tool.input_schema,
            output_schema=tool.output_schema
            if tool.output_schema is not None
            else PERMISSIVE_SCHEMA,
            version=c.version,
            side_effects=c.side_effects,
            cache_ttl=c.cache_ttl,
            timeout=c.timeout,
            max_concurrency=c.max_concurrency,
            cost_nano_usd=c.cost_nano_usd,
            shared_cache=c.shared_cache,
            retries=c.retries,
        )

    async def _session(self) -> _Connection:
        """The live connection, opening one if there is none (one opener at a time)."""
        async with self._connecting:
            if self._closed:
                raise _unavailable(self.name, "the source is closed")
            connection = self._connection
            if connection is None or not connection.alive:
                if connection is not None:
                    self._drop(connection)
                connection = self._connection = _Connection(self._transport, self.name)
        try:
            await connection.wait_ready(self._connect_timeout)
        except ToolError:
            self._drop(connection)
            raise
        return connection

    async def _request(self, fn: Callable[[Session], Awaitable[T]]) -> T:
        """``fn(session)`` on the live session, errors as ``ToolError`` (see the class)."""
        connection = await self._session()
        try:
            return await connection.call(fn)
        except MCPError as error:
            if not _session_expired(error):
                raise self._translate(error, connection) from error
            self._drop(connection)
        except Exception as error:
            raise self._translate(error, connection) from error
        # The server had forgotten the session and refused the request: one more try.
        connection = await self._session()
        try:
            return await connection.call(fn)
        except Exception as error:
            raise self._translate(error, connection) from error

    def _translate(self, error: Exception, connection: _Connection) -> Exception:
        """The exception a caller sees for ``error``; drops the connection if it is lost."""
        if isinstance(error, ToolError):
            if error.code == UNAVAILABLE:
                self._drop(connection)
            return error
        if isinstance(error, MCPError):
            if _session_lost(error):
                self._drop(connection)
                return _unavailable(self.name, error.message)
            if error.code == mcp_types.REQUEST_TIMEOUT:
                return ToolError("TOOL_TIMEOUT", error.message, retryable=True)
            return ToolError(
                PROTOCOL_ERROR,
                f"MCP server {self.name!r}: {error.message}",
                details={"server": self.name, "mcp_code": str(error.code)},
            )
        if isinstance(error, anyio.ClosedResourceError | anyio.BrokenResourceError | OSError):
            self._drop(connection)
            return _unavailable(self.name, _describe(error))
        if isinstance(error, ValidationError | RuntimeError):
            # A result that breaks the protocol or the tool's own outputSchema.
            return ToolError(
                PROTOCOL_ERROR, f"MCP server {self.name!r}: {error}", details={"server": self.name}
            )
        return error

    def _drop(self, connection: _Connection) -> None:
        """Forget ``connection`` (the next call reconnects) and close it in the background."""
        if self._connection is connection:
            self._connection = None
        if connection.task.done() or connection.closing:
            return
        connection.close_soon()
        closing = asyncio.ensure_future(connection.aclose())
        self._retiring.add(closing)
        closing.add_done_callback(self._retiring.discard)


async def _list_all_tools(session: Session) -> list[mcp_types.Tool]:
    """Every tool, following pagination cursors."""
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    while True:
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools
