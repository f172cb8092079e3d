"""The tools of one MCP server (stdio command, Streamable HTTP or HTTP+SSE URL), served as
gateway tools.

``McpSource(config)`` keeps one MCP session open (``mcp_session.McpConnection``): started
lazily by the first ``tools()`` or tool call, closed by ``aclose()``. Each MCP tool the
entry's ``include``/``exclude`` let through becomes a ``Tool`` named
``config.prefix + tool.name`` whose contract is the server's (description, input schema,
output schema or a permissive one) and whose execution policy comes from the tool's
annotations and the entry (``mcp_policy``). The server's resources, if any, are read
through one more tool, ``<prefix>read_resource`` (``mcp_resources``).

Changes. ``watch(changed)`` registers the callback the gateway uses to keep its catalog
current: it is called when the server sends ``notifications/tools/list_changed`` (or
``resources/list_changed``) and when the server goes away; the gateway then lists again
(``trellis_toolgateway.sources``), which also reconnects.

Lost connections. A call that finds the session already ended (the stdio server exited,
nothing in flight) is sent on a new session, whatever the tool: it never reached the
server. A streamable-HTTP server that forgot the session refuses the request before
running anything, so it is sent again too. A call in flight when the session was lost
may or may not have run: it is sent once more on a new session only when the tool is
safe to repeat (read-only or idempotent), else it fails ``MCP_UNAVAILABLE`` (retryable).

Secrets. ``${VAR}`` in ``env`` and ``headers`` are read from the environment when the
source is made (``tools.secrets``): redacted everywhere the process writes, and scrubbed
from the outputs and errors of the server's tools.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import anyio
import mcp.types as mcp_types
from mcp import MCPError
from pydantic import ValidationError

from trellis.runtime import context
from trellis.runtime.logs import get_logger
from trellis_toolgateway.tools.base import Json, Spec, Tool, ToolError, ToolSource
from trellis_toolgateway.tools.config import McpServer
from trellis_toolgateway.tools.mcp_policy import policy_of, served, unknown_overrides
from trellis_toolgateway.tools.mcp_resources import (
    ANNOTATIONS,
    INPUT_SCHEMA,
    READ_RESOURCE,
    Resources,
    contents_of,
    list_resources,
)
from trellis_toolgateway.tools.mcp_session import (
    UNAVAILABLE,
    McpConnection,
    NotSent,
    Session,
    describe,
    session_expired,
    session_lost,
    unavailable,
)
from trellis_toolgateway.tools.mcp_transport import transport_for
from trellis_toolgateway.tools.secrets import MissingSecret, resolve, scrub

log = get_logger(__name__)

T = TypeVar("T")

#: Longest wait for a server to start and answer ``initialize`` (a cold ``npx -y`` or
#: ``uvx`` downloads first); TRELLIS_TOOL_SOURCE_CONNECT_SECONDS sets it for the gateway.
CONNECT_TIMEOUT = 60.0

#: The output contract of an MCP tool that declares no outputSchema: any JSON value.
PERMISSIVE_SCHEMA: dict[str, Json] = {}

TOOL_ERROR = "MCP_TOOL_ERROR"
PROTOCOL_ERROR = "MCP_PROTOCOL_ERROR"


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

    def __init__(
        self, source: McpSource, spec: Spec, remote_name: str, *, safe_to_repeat: bool
    ) -> None:
        self.spec = spec
        self.remote_name = remote_name
        #: Whether a call lost with its connection may be sent again (see the module).
        self.safe_to_repeat = safe_to_repeat
        self._source = source

    async def run(self, args: dict[str, Json]) -> Json:
        # The invoker bounds the call too; this bound also ends the request at the server.
        limit = context.call_timeout(self.spec.timeout)
        return await self._source.call_tool(
            self.remote_name, args, read_timeout=limit, safe_to_repeat=self.safe_to_repeat
        )


class McpResourceTool(Tool):
    """``<prefix>read_resource``: ``resources/read`` of one URI on the source's session."""

    def __init__(self, source: McpSource, spec: Spec) -> None:
        self.spec = spec
        self._source = source

    async def run(self, args: dict[str, Json]) -> Json:
        # Bounded by the invoker (the SDK's resources/read takes no timeout of its own).
        return await self._source.read_resource(str(args["uri"]))


class McpSource(ToolSource):
    """The tools of the MCP server ``config`` declares, over one lazily opened session.

    ``tools()`` and tool calls raise ``ToolError(MCP_UNAVAILABLE, retryable=True)`` when
    the server cannot be reached or the session is lost; a later call reconnects.
    ``MissingSecret`` (a ``ValueError``, key ``env.<NAME>`` or ``headers.<Name>``) when a
    ``${VAR}`` is not set.
    """

    kind = "mcp"

    def __init__(
        self,
        config: McpServer,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        cwd: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if config.command is not None and not config.command:
            raise ValueError(f"MCP server {config.name!r}: command is empty")
        self.config = config
        try:
            env = resolve(config.env, environ)
        except MissingSecret as error:
            raise MissingSecret(f"env.{error.key}", error.variable) from None
        try:
            headers = resolve(config.headers, environ)
        except MissingSecret as error:
            raise MissingSecret(f"headers.{error.key}", error.variable) from None
        self._secrets = tuple(sorted({*env.secrets, *headers.secrets}, key=len, reverse=True))
        self._transport = transport_for(config, env=env.values, headers=headers.values, cwd=cwd)
        self._connect_timeout = connect_timeout
        self._connection: McpConnection | None = None
        self._connecting = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._changed: Callable[[], None] | None = None
        self._closed = False
        if config.input_schema is not None or config.output_schema is not None:
            log.warning(
                "input_schema/output_schema of an MCP server are ignored: each tool has its own",
                server=config.name,
            )

    @property
    def name(self) -> str:
        return self.config.name

    def watch(self, changed: Callable[[], None]) -> None:
        self._changed = changed

    async def tools(self) -> list[Tool]:
        listed, resources = await self._request(_list_everything, resend=True)
        names = {tool.name for tool in listed}
        if unknown := unknown_overrides(self.config, names | {READ_RESOURCE}):
            log.warning("overrides for tools the server lacks", server=self.name, names=unknown)
        tools: list[Tool] = [self._tool(tool) for tool in listed if served(self.config, tool.name)]
        if (
            self.config.resources
            and resources
            and READ_RESOURCE not in names  # the server's own tool of that name wins
            and served(self.config, READ_RESOURCE)
        ):
            tools.append(self._resource_tool(resources))
        return tools

    async def call_tool(
        self,
        name: str,
        args: dict[str, Json],
        *,
        read_timeout: float,
        safe_to_repeat: bool = False,
    ) -> Json:
        """``tools/call`` of the server's tool ``name``; its output as JSON."""

        async def call(session: Session) -> mcp_types.CallToolResult:
            return await session.call_tool(name, args, read_timeout_seconds=read_timeout)

        result = await self._request(call, resend=safe_to_repeat)
        if result.is_error:
            raise ToolError(
                TOOL_ERROR,
                self._scrub(_error_text(result)),
                details={"server": self.name, "tool": name},
            )
        return self._scrub(output_of(result))

    async def read_resource(self, uri: str) -> Json:
        """``resources/read`` of ``uri``: its contents as JSON (``mcp_resources``)."""

        async def read(session: Session) -> mcp_types.ReadResourceResult:
            return await session.read_resource(uri)

        try:
            result = await self._request(read, resend=True)
        except ToolError as error:
            if error.code == PROTOCOL_ERROR:  # e.g. an unknown URI: the server's answer
                raise ToolError(
                    "MCP_RESOURCE_ERROR", error.message, details={**error.details, "uri": uri}
                ) from None
            raise
        return self._scrub(contents_of(result))

    async def aclose(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()
        for task in list(self._retiring):
            with suppress(BaseException):
                await task

    def _scrub(self, value: Json) -> Json:
        return scrub(value, self._secrets)

    def _tool(self, tool: mcp_types.Tool) -> McpTool:
        policy, safe = policy_of(self.config, tool.name, tool.annotations)
        description = (
            policy.pop("description", None)
            or tool.description
            or tool.title
            or self.config.description
            or tool.name
        )
        spec = Spec(
            name=f"{self.config.prefix}{tool.name}",
            description=description,
            input_schema=tool.input_schema,
            output_schema=tool.output_schema
            if tool.output_schema is not None
            else PERMISSIVE_SCHEMA,
            **policy,
        )
        return McpTool(self, spec, tool.name, safe_to_repeat=safe)

    def _resource_tool(self, resources: Resources) -> McpResourceTool:
        policy, _ = policy_of(self.config, READ_RESOURCE, ANNOTATIONS)
        description = policy.pop("description", None) or resources.description(self.name)
        spec = Spec(
            name=f"{self.config.prefix}{READ_RESOURCE}",
            description=description,
            input_schema=INPUT_SCHEMA,
            output_schema=PERMISSIVE_SCHEMA,
            **policy,
        )
        return McpResourceTool(self, spec)

    # -- the session ---------------------------------------------------------------------

    async def _on_message(self, message: Any) -> None:
        """The server's notifications: a changed tool or resource list means list again."""
        if isinstance(
            message,
            mcp_types.ToolListChangedNotification | mcp_types.ResourceListChangedNotification,
        ):
            log.info("MCP server's list changed", server=self.name, method=message.method)
            self._notify()
        elif isinstance(message, Exception):
            log.debug("MCP transport error", server=self.name, error=describe(message))

    def _notify(self) -> None:
        if self._changed is not None and not self._closed:
            self._changed()

    async def _session(self) -> McpConnection:
        """The live connection, opening one if there is none (one opener at a time)."""
        async with self._connecting:
            if self._closed:
                raise unavailable(self.name, "the source is closed")
            connection = self._connection
            if connection is None or not connection.alive:
                if connection is not None:
                    self._drop(connection)
                connection = McpConnection(
                    self._transport, self.name, on_message=self._on_message, on_end=self._notify
                )
                self._connection = connection
        try:
            await connection.wait_ready(self._connect_timeout)
        except ToolError:
            self._drop(connection)
            raise
        return connection

    async def _request(self, fn: Callable[[Session], Awaitable[T]], *, resend: bool) -> T:
        """``fn(session)`` on the live session, errors as ``ToolError`` (see the module):
        sent at most twice, the second time on a new session."""
        for attempt in (1, 2):
            connection = await self._session()
            try:
                return await connection.call(fn)
            except NotSent:
                self._drop(connection)
                error: Exception = unavailable(self.name, "the connection had ended")
                again = True  # it never reached the server
            except MCPError as mcp_error:
                if session_expired(mcp_error):
                    self._drop(connection)
                    error, again = unavailable(self.name, mcp_error.message), True
                else:
                    error, lost = self._translate(mcp_error, connection)
                    again = lost and resend
            except Exception as other:
                error, lost = self._translate(other, connection)
                again = lost and resend
            if not again or attempt == 2:
                raise error
            log.info("MCP call sent again on a new session", server=self.name)
        raise AssertionError("unreachable")

    def _translate(self, error: Exception, connection: McpConnection) -> tuple[Exception, bool]:
        """The exception a caller sees for ``error``, and whether the session was lost
        (then the connection is dropped: the next call reconnects)."""
        if isinstance(error, ToolError):
            if error.code == UNAVAILABLE:
                self._drop(connection)
                return error, True
            return error, False
        if isinstance(error, MCPError):
            if session_lost(error):
                self._drop(connection)
                return unavailable(self.name, error.message), True
            if error.code == mcp_types.REQUEST_TIMEOUT:
                return ToolError("TOOL_TIMEOUT", error.message, retryable=True), False
            return ToolError(
                PROTOCOL_ERROR,
                self._scrub(f"MCP server {self.name!r}: {error.message}"),
                details={"server": self.name, "mcp_code": str(error.code)},
            ), False
        if isinstance(error, anyio.ClosedResourceError | anyio.BrokenResourceError | OSError):
            self._drop(connection)
            return unavailable(self.name, describe(error)), True
        if isinstance(error, ValidationError | RuntimeError):
            # A result that breaks the protocol or the tool's own outputSchema.
            message = self._scrub(f"MCP server {self.name!r}: {error}")
            return ToolError(PROTOCOL_ERROR, message, details={"server": self.name}), False
        return error, False

    def _drop(self, connection: McpConnection) -> None:
        """Forget ``connection`` (the next call reconnects) and close it in the background."""
        if self._connection is connection:
            self._connection = None
        if connection.task.done() or connection.closing:
            return
        connection.close_soon()
        closing = asyncio.ensure_future(connection.aclose())
        self._retiring.add(closing)
        closing.add_done_callback(self._retiring.discard)


async def _list_everything(session: Session) -> tuple[list[mcp_types.Tool], Resources]:
    """Every tool (following pagination cursors) and the resources, in one request slot."""
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    while True:
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools, await list_resources(session)
