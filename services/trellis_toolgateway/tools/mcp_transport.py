"""How the gateway reaches an MCP server: stdio, Streamable HTTP or the legacy HTTP+SSE.

Each transport is an async context manager yielding the (read, write) stream pair a
``ClientSession`` runs on (``McpConnection`` enters it in its owner task).

- stdio: the server is a child process; its environment is the config's ``env`` (secrets
  resolved) over the SDK's minimal inherited one (HOME, PATH, USER, ...), so the gateway's
  own secrets do not reach it. Its stderr would otherwise land unprefixed among the
  gateway's JSON logs: it goes to a pipe instead, and each line becomes a log event
  ``MCP server stderr`` tagged with the server (JSON like every other line, and redacted).
- Streamable HTTP and HTTP+SSE: the config's ``headers`` (secrets resolved) go with every
  request, e.g. ``Authorization`` for a remote server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import httpx2
from mcp import StdioServerParameters, stdio_client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from trellis.runtime.logs import get_logger
from trellis_toolgateway.tools.config import McpServer
from trellis_toolgateway.tools.mcp_session import Transport

log = get_logger(__name__)

#: A stderr line longer than this is logged in pieces (a server dumping a blob).
MAX_STDERR_LINE = 4096
#: After the server stopped, how long its last stderr lines may take to arrive.
STDERR_DRAIN_SECONDS = 1.0
#: The MCP SDK's defaults: 30 s to connect/write, 300 s to wait on a response stream.
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)


class _StderrLines(asyncio.Protocol):
    """Reads a server's stderr pipe; each line is one log event tagged with the server."""

    def __init__(self, server: str) -> None:
        self._server = server
        self._buffer = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            self._emit(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
        while len(self._buffer) > MAX_STDERR_LINE:
            self._emit(bytes(self._buffer[:MAX_STDERR_LINE]))
            del self._buffer[:MAX_STDERR_LINE]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buffer:
            self._emit(bytes(self._buffer))
            self._buffer.clear()
        if not self.done.done():
            self.done.set_result(None)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if line.strip():
            log.info("MCP server stderr", server=self._server, line=line)


@asynccontextmanager
async def stderr_to_log(server: str) -> AsyncIterator[TextIO]:
    """A file to give a child process as its stderr; what it writes is logged by line."""
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb", buffering=0)
    writer = os.fdopen(write_fd, "w")
    lines = _StderrLines(server)
    loop = asyncio.get_running_loop()
    try:
        pipe, _ = await loop.connect_read_pipe(lambda: lines, reader)
    except BaseException:
        reader.close()
        writer.close()
        raise
    try:
        yield writer
    finally:
        writer.close()  # the child's copy closes when it exits: then the pipe ends
        try:
            await asyncio.wait_for(asyncio.shield(lines.done), STDERR_DRAIN_SECONDS)
        except (TimeoutError, asyncio.CancelledError):
            pass  # a grandchild still holds it open; stop reading
        finally:
            pipe.close()


def transport_for(
    config: McpServer,
    *,
    env: Mapping[str, str],
    headers: Mapping[str, str],
    cwd: str | Path | None,
) -> Transport:
    """The transport of ``config``, with its ``${VAR}`` references already resolved."""
    if config.url is not None:
        url, sent = config.url, dict(headers)
        if config.transport == "sse":
            return lambda: sse_client(url, headers=sent or None)
        return lambda: _streamable_http(url, sent)
    assert config.command is not None
    command, *args = config.command
    params = StdioServerParameters(command=command, args=args, env=dict(env), cwd=cwd)
    return lambda: _stdio(params, config.name)


@asynccontextmanager
async def _stdio(params: StdioServerParameters, server: str) -> AsyncIterator[Any]:
    async with stderr_to_log(server) as errlog, stdio_client(params, errlog=errlog) as streams:
        yield streams


@asynccontextmanager
async def _streamable_http(url: str, headers: dict[str, str]) -> AsyncIterator[Any]:
    async with (
        httpx2.AsyncClient(headers=headers, timeout=HTTP_TIMEOUT) as client,
        streamable_http_client(url, http_client=client) as streams,
    ):
        yield streams
