"""Tool registries for gateway tests, built from a tools file without a service around it.

The service loads ``TRELLIS_TOOLS_FILE`` through its watcher (``reload.py``); tests want
the same registry in one call: the bundled file's tools (``builtin_registry``, no
network) or any file's (``load_registry``).
"""

from __future__ import annotations

import os

from trellis_toolgateway.loader import (
    BUNDLED_TOOLS_FILE,
    LoadOptions,
    build_registry,
    declared_registry,
    read_tools_file,
)
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.command import Launcher


def builtin_registry(
    *,
    command_timeout: float = 10.0,
    command_max_output_bytes: int = 64 * 1024,
    launcher: Launcher | None = None,
) -> ToolRegistry:
    """The tools of the bundled tools file (builtins and ``run_command``)."""
    options = LoadOptions(
        command_timeout=command_timeout,
        command_max_output_bytes=command_max_output_bytes,
        launcher=launcher,
    )
    return declared_registry(BUNDLED_TOOLS_FILE, options)


async def load_registry(
    path: str | os.PathLike[str], options: LoadOptions, *, previous: ToolRegistry | None = None
) -> ToolRegistry:
    """Read ``path`` and build its full registry, sources included (``build_registry``)."""
    return await build_registry(read_tools_file(path), path, options, previous=previous)
