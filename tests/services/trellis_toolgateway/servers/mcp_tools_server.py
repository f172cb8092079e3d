"""A small MCP server for the McpSource tests, written with the SDK's ``MCPServer``.

Run as a script: ``python mcp_tools_server.py`` serves over stdio;
``python mcp_tools_server.py --http [--port N]`` serves streamable HTTP on 127.0.0.1 (port 0
picks a free one) and prints ``listening <port>`` once the socket is bound, so a test can
start it as a real process, kill it, and start it again on the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image

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


async def _serve_http(port: int) -> None:
    import uvicorn

    # Bind first so port 0 works and the real port can be announced before serving.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)  # listening before the announcement: connects queue, never get refused
    app = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"listening {sock.getsockname()[1]}", flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    if options.http:
        asyncio.run(_serve_http(options.port))
    else:
        server.run("stdio")


if __name__ == "__main__":
    sys.exit(main())
