"""The sandbox root: the one directory tree file tools and path parameters may touch.

A caller's path is resolved with ``os.path.realpath`` (every ``..`` and every symlink,
in every component, followed) and refused unless the result is the root or below it.
Resolving first and checking the *result* is what makes ``../etc/passwd``,
``/etc/passwd`` and ``link-to-etc/passwd`` all fail the same way; tools then use the
resolved path, never the caller's text, so a symlink is not followed a second time.
"""

from __future__ import annotations

import os
from pathlib import Path

from trellis.runtime.errors import FieldViolation, InvalidArgument, quote


class Sandbox:
    """Paths under ``root`` (itself resolved once, so a symlinked root works)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(root)

    def resolve(self, path: str, *, field: str = "args.path", tool: str = "") -> str:
        """The real path of ``path`` (relative to the root) or ``PATH_OUTSIDE_SANDBOX``."""
        if "\x00" in path:
            raise self._outside(path, field, tool)
        real = os.path.realpath(os.path.join(self.root, path))
        if not self.contains(real):
            raise self._outside(path, field, tool)
        return real

    def contains(self, real: str) -> bool:
        """Whether an already resolved path is the root or below it."""
        return os.path.commonpath([self.root, real]) == self.root

    def canonical(self, path: str) -> str:
        """The one spelling of ``path``: its real path relative to the root (``.`` for
        the root), so ``./a//b``, ``a/../a/b`` and a symlink to it name the same file in
        cache tags. ``path`` itself when it is outside (a call with it fails anyway)."""
        try:
            return self.relative(self.resolve(path))
        except InvalidArgument:
            return path

    def relative(self, real: str) -> str:
        """How a resolved path is shown to callers: relative to the root (``.`` for it)."""
        return Path(os.path.relpath(real, self.root)).as_posix()

    @staticmethod
    def _outside(path: str, field: str, tool: str) -> InvalidArgument:
        message = f"path {quote(path)} is outside the sandbox"
        return InvalidArgument(
            message,
            reason="PATH_OUTSIDE_SANDBOX",
            violations=[FieldViolation(field, message)],
            metadata={"tool": tool} if tool else None,
        )
