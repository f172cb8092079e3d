"""Keeps the gateway's registry in step with its tools file, by polling.

Why polling and not inotify/watchdog: a stat every couple of seconds costs nothing and
works everywhere the file may live — bind mounts and overlay filesystems in containers
(where change events from the host are often not delivered), network filesystems, and
Kubernetes ConfigMap volumes, which update by swapping a symlink — with no extra
dependency. A change is seen as a new (mtime, size, inode, device): an in-place edit
moves the mtime or size, an atomic rename or a ConfigMap update the inode. A change
whose bytes are the same as those last tried (``touch``) loads nothing.

A file that does not load (YAML, schema, regex, JSON Schema, unknown builtin, missing
secret, ...) is logged as one error naming the file and the place inside it, and the last
good registry stays in force; the same bad bytes are not retried every poll, the next
edit is. A good file replaces the registry atomically (``RegistryHolder.swap``), then
``on_reload(old, new)`` runs (the service's: drop changed tools' cached results, warm
the cache again); the next poll waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from trellis.runtime.logs import get_logger
from trellis_toolgateway.loader import LoadOptions, ToolsFileError, build_registry, parse_tools_file
from trellis_toolgateway.registry import RegistryHolder, ToolRegistry

#: What tells one version of the file from the next without reading it.
Signature = tuple[int, int, int, int]


def _log() -> structlog.stdlib.BoundLogger:
    """A fresh logger per event (reloads are rare), so log capture in tests sees them."""
    return get_logger(__name__)


def signature(path: Path) -> Signature | None:
    """(mtime_ns, size, inode, device) of ``path`` (symlinks followed), None if missing."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino, info.st_dev


class ToolsFileWatcher:
    """Loads ``path`` into a ``RegistryHolder`` and reloads it every ``interval`` seconds
    when it changed (``interval`` 0: loaded once, never reloaded)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        options: LoadOptions,
        *,
        interval: float,
        on_reload: Callable[[ToolRegistry, ToolRegistry], Awaitable[None]] | None = None,
    ):
        self.path = Path(path)
        self.on_reload = on_reload
        self.interval = interval
        self.options = options
        self.holder: RegistryHolder | None = None
        #: The last rejection (None once a good file loaded); logged as well.
        self.last_error: str | None = None
        self.reloads = 0
        self._signature: Signature | None = None
        #: sha256 of the bytes last tried, and of the bytes now in force.
        self._tried = b""
        self._good = b""
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> RegistryHolder:
        """The first load: a bad file raises ``ToolsFileError`` (start-up must stop)."""
        self._signature = signature(self.path)
        data = self._read()
        self._tried = hashlib.sha256(data).digest()
        self.holder = RegistryHolder(await self._build(data))
        self._good = self._tried
        return self.holder

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as error:
            raise ToolsFileError(self.path, [f"cannot read the file: {error}"]) from None

    async def _build(self, data: bytes, previous: ToolRegistry | None = None) -> ToolRegistry:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ToolsFileError(self.path, [f"not UTF-8 text: {error}"]) from None
        tools_file = parse_tools_file(text, self.path)
        return await build_registry(tools_file, self.path, self.options, previous=previous)

    async def check(self) -> bool:
        """One poll: reload if the file changed. True when a new registry is in force."""
        assert self.holder is not None, "load() first"
        seen = signature(self.path)
        if seen == self._signature:
            return False
        self._signature = seen
        try:
            if seen is None:
                raise ToolsFileError(self.path, ["the file is missing"])
            data = self._read()
            digest = hashlib.sha256(data).digest()
            if digest == self._tried:
                if digest == self._good:
                    self.last_error = None  # e.g. back after going missing, unchanged
                return False
            self._tried = digest
            registry = await self._build(data, self.holder.current)
        except Exception as error:  # a file error, or a bug while building: keep serving
            message = str(error)
            if not isinstance(error, ToolsFileError):
                message = f"{self.path}: {type(error).__name__}: {error}"
            self.last_error = message
            _log().error(
                "tools file rejected; the last good registry stays in force",
                file=str(self.path),
                error=message,
            )
            return False
        old = self.holder.swap(registry)
        self._good = self._tried
        self.last_error = None
        self.reloads += 1
        _log().info(
            "tools file reloaded",
            file=str(self.path),
            tools=len(registry),
            added=sorted(set(registry) - set(old)),
            removed=sorted(set(old) - set(registry)),
        )
        if self.on_reload is not None:
            try:
                await self.on_reload(old, registry)
            except Exception:  # the new registry is in force either way
                _log().exception("after-reload work failed", file=str(self.path))
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # a bug here must not end reloading for good
                _log().exception("tools file check failed", file=str(self.path))

    def start(self) -> None:
        """Poll in the background (no-op when ``interval`` is 0)."""
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._poll(), name="tools-file-watcher")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
