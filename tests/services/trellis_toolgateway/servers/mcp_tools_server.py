"""A small MCP server for the McpSource tests, written with the SDK's ``MCPServer``.

Run as a script: ``python mcp_tools_server.py`` serves over stdio;
``python mcp_tools_server.py --http [--port N]`` serves streamable HTTP on 127.0.0.1 (port 0
picks a free one) and prints ``listening <port>`` once the socket is bound, so a test can
start it as a real process, kill it, and start it again on the same port; ``--sse`` serves
the legacy HTTP+SSE transport instead (``/sse``). ``--start-delay S`` waits S seconds
before serving (a slow ``npx -y``/``uvx`` start). At start it writes one line to stderr
naming itself and the value of ``TRELLIS_MCP_TEST_SECRET`` (a server that leaks its
configuration into its logs).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import sys
import time
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from mcp.types import ToolAnnotations

server = MCPServer("trellis-test-tools", log_level="WARNING")


@server.tool(description="Add two integers.")
def add(a: int, b: int) -> dict[str, int]:
    # A dict return type: the SDK advertises an outputSchema and sends structuredContent.
    return {"sum": a + b}


@server.tool(description="Echo the text back as plain text content.", structured_output=False)
def echo(text: str) -> str:
    return text


@server.tool(description="Two text blocks.", structured_output=False)
def lines(first: str, second: str) -> list[str]:
    return [first, second]


@server.tool(description="A text block and an image.", structured_output=False)
def picture(caption: str) -> list[object]:
    return [caption, Image(data=b"\x89PNG", format="png")]


@server.tool(description="Always fails.", structured_output=False)
def fail(reason: str) -> str:
    # ToolError's message reaches the client as the text of an isError result.
    raise ToolError(f"failed on purpose: {reason}")


@server.tool(description="The value of an environment variable ('' if unset).")
def env(name: str) -> dict[str, str]:
    return {"value": os.environ.get(name, "")}


@server.tool(description="This server process's id.")
def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@server.tool(description="Sleep, then answer.")
async def slow(seconds: float) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@server.tool(description="The W3C traceparent the call carried in _meta ('' if none).")
def traceparent(ctx: Context) -> dict[str, str]:
    meta = ctx.request_context.params or {}
    return {"traceparent": str((meta.get("_meta") or {}).get("traceparent", ""))}


@server.tool(description="Kill this server process in the middle of the call.")
def die() -> str:
    os._exit(3)


READ_ONLY = ToolAnnotations(read_only_hint=True)


@server.tool(description="Look a key up (read-only).", annotations=READ_ONLY)
def lookup(key: str) -> dict[str, str]:
    return {"key": key, "value": key.upper()}


@server.tool(
    description="Store a value, replacing what was there.",
    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True),
)
def store(key: str, value: str) -> dict[str, str]:
    return {"stored": key}


@server.tool(
    description="Append a line to a log.",
    annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=False),
)
def append(line: str) -> dict[str, str]:
    return {"appended": line}


@server.tool(
    description="Make sure a directory exists.",
    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True),
)
def ensure(path: str) -> dict[str, str]:
    return {"ensured": path}


def _first_call_dies(marker: str) -> dict[str, int]:
    """The first call (no marker yet) kills the server mid-call; later ones answer."""
    if not Path(marker).exists():
        Path(marker).write_text("died once")
        os._exit(3)
    return {"pid": os.getpid()}


@server.tool(description="Read, killing the server the first time.", annotations=READ_ONLY)
def flaky_read(marker: str) -> dict[str, int]:
    return _first_call_dies(marker)


@server.tool(
    description="Write, killing the server the first time.",
    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True),
)
def flaky_write(marker: str) -> dict[str, int]:
    return _first_call_dies(marker)


@server.tool(description="Write a line to this server's stderr.", annotations=READ_ONLY)
def shout(text: str) -> dict[str, bool]:
    print(text, file=sys.stderr, flush=True)
    return {"shouted": True}


@server.tool(description="A request header the server received ('' if none), and its sha256.")
def header(name: str, ctx: Context) -> dict[str, str]:
    value = (ctx.headers or {}).get(name.lower(), "")
    return {"value": value, "sha256": hashlib.sha256(value.encode()).hexdigest()}


@server.tool(description="Add a tool named `name` (it echoes) and tell the client.")
async def grow(name: str, ctx: Context) -> dict[str, str]:
    def added(text: str) -> str:
        return f"{name}: {text}"

    server.add_tool(added, name=name, description=f"Added at run time: {name}.")
    await ctx.session.send_tool_list_changed()
    return {"added": name}


@server.resource("trellis://readme", name="readme", description="What this server is.")
def readme() -> str:
    return "A small MCP server for the gateway's tests."


@server.resource("trellis://notes/{topic}", name="note", description="A note on a topic.")
def note(topic: str) -> str:
    return f"Notes on {topic}."


async def _serve_http(port: int, sse: bool = False) -> None:
    import uvicorn

    # Bind first so port 0 works and the real port can be announced before serving.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)  # listening before the announcement: connects queue, never get refused
    app = server.sse_app(host="127.0.0.1") if sse else server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"listening {sock.getsockname()[1]}", flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--sse", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--start-delay", type=float, default=0.0)
    options = parser.parse_args()
    secret = os.environ.get("TRELLIS_MCP_TEST_SECRET", "")
    print(f"trellis-test-tools starting; secret={secret}", file=sys.stderr, flush=True)
    time.sleep(options.start_delay)
    if options.http or options.sse:
        asyncio.run(_serve_http(options.port, sse=options.sse))
    else:
        server.run("stdio")


if __name__ == "__main__":
    sys.exit(main())
