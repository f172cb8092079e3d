"""``read_file`` and ``list_dir``: read-only views of the sandbox root.

Every path goes through ``Sandbox.resolve`` (realpath, then must be inside the root) and
the tools open the *resolved* path, never the caller's text. ``read_file`` also opens
with ``O_NOFOLLOW`` and, where ``/proc`` exists, checks what the open descriptor really
is, so a symlink swapped in between the check and the open is caught too. Reads are
capped (``truncated`` says so) and run in a thread so a slow disk never blocks the loop.
"""

from __future__ import annotations

import asyncio
import os
import stat

from trellis_toolgateway.tools.base import Json, Spec, Tool, ToolError
from trellis_toolgateway.tools.sandbox import Sandbox

_PATH_ARG = {
    "type": "string",
    "minLength": 1,
    "maxLength": 4096,
    "description": "Path relative to the sandbox root.",
}


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _os_failure(path: str, error: OSError) -> ToolError:
    if isinstance(error, FileNotFoundError):
        return ToolError("FILE_NOT_FOUND", f"{path!r} does not exist")
    if isinstance(error, NotADirectoryError):
        return ToolError("NOT_A_DIRECTORY", f"{path!r} is not a directory")
    if isinstance(error, PermissionError):
        return ToolError("PERMISSION_DENIED", f"{path!r} cannot be read")
    return ToolError("IO_ERROR", f"{path!r}: {error.strerror or error}")


def _canonical_path(sandbox: Sandbox, args: dict[str, Json], path: Json) -> dict[str, Json]:
    """``args`` with ``path`` in its one spelling (``Tool.cache_args``)."""
    if not isinstance(path, str):
        return args
    return {**args, "path": sandbox.canonical(path)}


class ReadFileTool(Tool):
    """Text of one file under the sandbox root, at most ``max_bytes`` of it."""

    def __init__(self, sandbox: Sandbox, *, name: str = "read_file", max_bytes: int = 1 << 20):
        self._sandbox = sandbox
        self._max_bytes = max_bytes
        self.spec = Spec(
            name=name,
            description=(
                "Read a text file inside the sandbox directory. Returns its content "
                f"(UTF-8, at most {max_bytes} bytes; longer files are cut and marked truncated)."
            ),
            input_schema={
                "type": "object",
                "properties": {"path": _PATH_ARG},
                "required": ["path"],
                "additionalProperties": False,
            },
            output_schema={
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string"},
                    "size": {"type": "integer"},
                    "truncated": {"type": "boolean"},
                },
                "required": ["path", "content", "size", "truncated"],
                "additionalProperties": False,
            },
            cache_ttl=0.0,
            timeout=10.0,
        )

    def cache_args(self, args: dict[str, Json]) -> dict[str, Json]:
        return _canonical_path(self._sandbox, args, args.get("path"))

    async def run(self, args: dict[str, Json]) -> Json:
        real = self._sandbox.resolve(args["path"], tool=self.spec.name)
        return await asyncio.to_thread(self._read, args["path"], real)

    def _read(self, shown: str, real: str) -> Json:
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            raise _os_failure(shown, error) from None
        try:
            opened = f"/proc/self/fd/{fd}"
            if os.path.exists(opened) and not self._sandbox.contains(os.path.realpath(opened)):
                raise ToolError("PATH_CHANGED", f"{shown!r} changed while it was opened")
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ToolError("NOT_A_FILE", f"{shown!r} is a {_kind(info.st_mode)}, not a file")
            with os.fdopen(fd, "rb", closefd=False) as file:
                data = file.read(self._max_bytes + 1)
        finally:
            os.close(fd)
        return {
            "path": self._sandbox.relative(real),
            "content": data[: self._max_bytes].decode("utf-8", errors="replace"),
            "size": info.st_size,
            "truncated": len(data) > self._max_bytes,
        }


class ListDirTool(Tool):
    """Names and types of a directory's entries under the sandbox root."""

    def __init__(self, sandbox: Sandbox, *, name: str = "list_dir", max_entries: int = 1000):
        self._sandbox = sandbox
        self._max_entries = max_entries
        self.spec = Spec(
            name=name,
            description=(
                "List a directory inside the sandbox directory: each entry's name and type "
                "(file, dir, symlink, other), sorted by name. Use path '.' for the root."
            ),
            input_schema={
                "type": "object",
                "properties": {"path": {**_PATH_ARG, "default": "."}},
                "additionalProperties": False,
            },
            output_schema={
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "entries": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "type": {"enum": ["file", "dir", "symlink", "other"]},
                                "size": {"type": "integer"},
                            },
                            "required": ["name", "type"],
                            "additionalProperties": False,
                        },
                    },
                    "truncated": {"type": "boolean"},
                },
                "required": ["path", "entries", "truncated"],
                "additionalProperties": False,
            },
            cache_ttl=0.0,
            timeout=10.0,
        )

    def cache_args(self, args: dict[str, Json]) -> dict[str, Json]:
        return _canonical_path(self._sandbox, args, args.get("path", "."))

    async def run(self, args: dict[str, Json]) -> Json:
        shown = args.get("path", ".")
        real = self._sandbox.resolve(shown, tool=self.spec.name)
        return await asyncio.to_thread(self._list, shown, real)

    def _list(self, shown: str, real: str) -> Json:
        entries: list[dict[str, Json]] = []
        try:
            with os.scandir(real) as scan:
                for entry in scan:
                    mode = entry.stat(follow_symlinks=False).st_mode
                    item: dict[str, Json] = {"name": entry.name, "type": _kind(mode)}
                    if stat.S_ISREG(mode):
                        item["size"] = entry.stat(follow_symlinks=False).st_size
                    entries.append(item)
        except OSError as error:
            raise _os_failure(shown, error) from None
        entries.sort(key=lambda e: e["name"])
        return {
            "path": self._sandbox.relative(real),
            "entries": entries[: self._max_entries],
            "truncated": len(entries) > self._max_entries,
        }
