"""An MCP server's resources, served as one ``<prefix>read_resource`` tool.

Plans are made of tool calls, so a server's resources (files, documents, records it
exposes by URI) are reachable through a tool: ``read_resource(uri)``, whose description
lists the resources and URI templates the server offered when it was last listed (so a
planner knows what to ask for). It is read-only: never side-effecting, cacheable when the
server entry sets a ``cache_ttl``, and subject to the entry's ``include``/``exclude`` and
``tools.read_resource`` overrides like any tool of the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import mcp.types as mcp_types
from mcp import ClientSession, MCPError

from trellis_toolgateway.tools.base import Json

#: The tool's name on the server's side (before the prefix).
READ_RESOURCE = "read_resource"
#: At most this many resources and templates are named in the description.
MAX_DESCRIBED = 50
#: Longest listing followed (pages); a server listing more is cut.
MAX_PAGES = 20

INPUT_SCHEMA: dict[str, Json] = {
    "type": "object",
    "properties": {"uri": {"type": "string", "minLength": 1, "description": "The resource's URI."}},
    "required": ["uri"],
    "additionalProperties": False,
}
#: The read-only hint the tool carries, so policy treats it like any read-only tool.
ANNOTATIONS = mcp_types.ToolAnnotations(read_only_hint=True)


@dataclass(frozen=True)
class Resources:
    """What a server offers to read: resources by URI and URI templates."""

    resources: list[mcp_types.Resource]
    templates: list[mcp_types.ResourceTemplate]

    def __bool__(self) -> bool:
        return bool(self.resources or self.templates)

    def description(self, server: str) -> str:
        lines = [f"Read a resource of the MCP server {server!r} by its URI."]
        items = [
            *(_line(r.uri, r.name, r.description) for r in self.resources),
            *(_line(t.uri_template, t.name, t.description) for t in self.templates),
        ]
        if self.resources:
            lines.append("Resources (uri: name - description) and URI templates:")
        else:
            lines.append("URI templates (fill in the {placeholders}):")
        lines.extend(items[:MAX_DESCRIBED])
        if len(items) > MAX_DESCRIBED:
            lines.append(f"... and {len(items) - MAX_DESCRIBED} more.")
        return "\n".join(lines)


def _line(uri: str, name: str, description: str | None) -> str:
    text = f"- {uri}: {name}"
    if description:
        text += f" - {' '.join(description.split())[:200]}"
    return text


async def list_resources(session: ClientSession) -> Resources:
    """The server's resources and templates; none if it offers no resources."""
    capabilities = session.server_capabilities
    if capabilities is None or capabilities.resources is None:
        return Resources([], [])
    resources: list[mcp_types.Resource] = []
    templates: list[mcp_types.ResourceTemplate] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_resources(params=params)
        resources.extend(page.resources)
        if not (cursor := page.next_cursor):
            break
    try:
        cursor = None
        for _ in range(MAX_PAGES):
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            listed = await session.list_resource_templates(params=params)
            templates.extend(listed.resource_templates)
            if not (cursor := listed.next_cursor):
                break
    except MCPError as error:  # templates are optional for a server
        if error.code != mcp_types.METHOD_NOT_FOUND:
            raise
    return Resources(resources, templates)


def contents_of(result: mcp_types.ReadResourceResult) -> Json:
    """A read resource as JSON: the text of a single text resource, else every content
    item as its MCP JSON object (``uri``, ``mimeType``, ``text`` or base64 ``blob``)."""
    contents = result.contents
    if len(contents) == 1 and isinstance(contents[0], mcp_types.TextResourceContents):
        return contents[0].text
    return [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in contents]
