"""The MCP servers the gateway's tests run: the in-repo test server and real ones from the
registries (``make install``: ``mcp-server-git`` from PyPI into the venv; npm's
``@modelcontextprotocol/server-everything`` and ``server-filesystem``, pinned in
``tests/services/trellis_toolgateway/servers/package.json``).

Each helper returns the argv that starts the server over stdio; a server that is not
installed fails the test with the command that installs it (never a silent skip).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

SERVERS = Path(__file__).resolve().parents[1] / "services" / "trellis_toolgateway" / "servers"
#: The in-repo test server (``--http``, ``--sse``, ``--start-delay``: see its docstring).
TEST_SERVER = SERVERS / "mcp_tools_server.py"
_NPM = SERVERS / "node_modules" / "@modelcontextprotocol"


def tools_server(*args: str) -> list[str]:
    return [sys.executable, str(TEST_SERVER), *args]


def _node_server(package: str) -> list[str]:
    script = _NPM / package / "dist" / "index.js"
    node = shutil.which("node")
    if not script.is_file() or node is None:
        pytest.fail(f"@modelcontextprotocol/{package} is not installed: run `make install`")
    return [node, str(script)]


def everything_server(*args: str) -> list[str]:
    """npm's reference server (tools with annotations, resources, list_changed)."""
    return [*_node_server("server-everything"), *args]


def filesystem_server(root: Path) -> list[str]:
    """npm's filesystem server, allowed to touch ``root`` only."""
    return [*_node_server("server-filesystem"), str(root)]


def git_server(repository: Path) -> list[str]:
    """PyPI's ``mcp-server-git``, confined to ``repository``."""
    try:
        import mcp_server_git  # noqa: F401
    except ImportError:
        pytest.fail("mcp-server-git is not installed: run `make install`")
    return [sys.executable, "-m", "mcp_server_git", "--repository", str(repository)]
