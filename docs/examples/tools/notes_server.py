"""A small MCP server for docs/tools.md: notes kept in memory, served over stdio.

The gateway starts it (``mcp-stdio.yaml``) and keeps one session to it; any MCP server
works the same way. Written with the ``mcp`` SDK's ``MCPServer``: a typed function is a
tool, its signature the input schema, a dict return type the output schema.
"""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("notes")
NOTES: dict[str, str] = {}


@server.tool(description="Save a note under a title (replaces a note of that title).")
def save_note(title: str, text: str) -> dict[str, str]:
    NOTES[title] = text
    return {"saved": title, "owner": os.environ.get("NOTES_OWNER", "")}


@server.tool(description="The text of the note saved under a title.")
def read_note(title: str) -> dict[str, str]:
    return {"title": title, "text": NOTES.get(title, "")}


if __name__ == "__main__":
    server.run("stdio")
