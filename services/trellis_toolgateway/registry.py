"""The catalog one gateway serves, and the holder that swaps it on reload and on change.

A registry is immutable once built: the tools file's own tools (declared, checked at
load) composed with what each tool source serves at that moment (``sources``). When the
catalog changes (a reload, a source answering late, a server's ``list_changed``) a whole
new registry is built and ``RegistryHolder`` installs it in one assignment, so a call
sees either the old set or the new set, never a mix, and a call already running keeps
the ``Entry`` it looked up. The sources a replaced registry brought are closed after its
calls have had time to finish, unless the new one still uses them.

Names. Each name is served by the first tool to claim it, in the file's order: the
``tools`` entries, then ``mcp_servers``, then ``grpc_tool_servers``, each in the order
written (not the order the sources happened to answer, so the outcome does not depend on
timing). A later tool with a taken name is not served: it is a ``Collision``, listed by
ListTools and counted in ``trellis_tool_name_collisions{source}``; use a ``prefix``.

``version`` identifies the catalog as ListTools shows it (a digest of every tool's
spec): it changes when a tool is added, removed or changed, and the executor refreshes
its copy of the catalog when it moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import TOOL_NAME_COLLISIONS
from trellis_toolgateway.entries import Entry, entry_of
from trellis_toolgateway.invalidation import InvalidationIndex
from trellis_toolgateway.sources import SourceHandle
from trellis_toolgateway.tools.base import Spec, Tool
from trellis_toolgateway.tools.config import WarmCall

log = get_logger(__name__)

#: Longest wait before closing the sources of a replaced registry.
MAX_RETIRE_SECONDS = 300.0
#: ``Collision.served_by`` of a name the tools file's own ``tools`` entries hold.
DECLARED = "tools"

__all__ = [
    "DECLARED",
    "Collision",
    "Entry",
    "RegistryHolder",
    "SourceHandle",
    "ToolLookup",
    "ToolRegistry",
]


@dataclass(frozen=True)
class Collision:
    """A source's tool not served because another holds its name."""

    tool: str
    #: Who serves the name: ``DECLARED`` (the tools file's ``tools``) or a source's name.
    served_by: str
    #: The source whose tool of that name is not served.
    skipped: str


class ToolLookup(Protocol):
    """What the invoker and servicer need: a ``ToolRegistry`` or a ``RegistryHolder``."""

    def get(self, name: str) -> Entry | None: ...

    def specs(self) -> list[Spec]: ...

    def snapshot(self) -> ToolRegistry: ...

    @property
    def invalidation(self) -> InvalidationIndex: ...


class ToolRegistry:
    """Tools by name: the declared ones (``register``; a name twice is a bug) and, once
    ``composed``, the sources'. Names follow ``TOOL_NAME``: a tool named otherwise is
    refused, as calls could not name it."""

    def __init__(self, tools: Sequence[Tool] | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        self._declared: list[Entry] = []
        self.sources: list[SourceHandle] = []
        self.collisions: list[Collision] = []
        #: Tools each source serves in this catalog (its listed ones minus collisions).
        self.served: dict[str, int] = {}
        #: Calls to make so their results are cached (the tools file's ``warm``).
        self.warm: list[WarmCall] = []
        self._invalidation: InvalidationIndex | None = None
        for tool in tools or ():
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add a declared tool; ``ValueError``/``SchemaError`` when it cannot be served."""
        name = tool.spec.name
        if name in self._entries:
            raise ValueError(f"tool {name!r} is registered twice")
        entry = entry_of(tool)
        self._entries[name] = entry
        self._declared.append(entry)
        self._invalidation = None

    def composed(self) -> ToolRegistry:
        """A new registry: these declared tools and sources, with each source's tools
        as it serves them now (see the module docstring for the naming rule)."""
        new = ToolRegistry()
        new._declared = list(self._declared)
        new._entries = {entry.tool.spec.name: entry for entry in self._declared}
        new.sources = list(self.sources)
        new.warm = list(self.warm)
        owner = dict.fromkeys(new._entries, DECLARED)
        for handle in new.sources:
            served = 0
            for entry in handle.entries:
                name = entry.tool.spec.name
                if name in new._entries:
                    new.collisions.append(Collision(name, owner[name], handle.name))
                    continue
                new._entries[name] = entry
                owner[name] = handle.name
                served += 1
            new.served[handle.name] = served
        return new

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def specs(self) -> list[Spec]:
        return [e.tool.spec for e in self._entries.values()]

    def snapshot(self) -> ToolRegistry:
        return self

    @cached_property
    def version(self) -> str:
        """A digest of the catalog as ListTools shows it (every tool's spec)."""
        digest = hashlib.sha256()
        for name in sorted(self._entries):
            proto = self._entries[name].tool.spec.to_proto()
            digest.update(proto.SerializeToString(deterministic=True))
            digest.update(b"\x00")
        return digest.hexdigest()[:32]

    def tools(self) -> dict[str, Tool]:
        return {name: e.tool for name, e in self._entries.items()}

    @property
    def invalidation(self) -> InvalidationIndex:
        """The ``invalidates`` rules resolved against these tools (built once)."""
        if self._invalidation is None:
            self._invalidation = InvalidationIndex(e.tool for e in self._entries.values())
        return self._invalidation

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def longest_timeout(self) -> float:
        return max((s.timeout for s in self.specs()), default=0.0)

    async def aclose(self) -> None:
        """Close this registry's sources (each once; one failing does not stop the rest)."""
        await close_sources(self.sources)


async def close_sources(handles: Sequence[SourceHandle]) -> None:
    for handle in handles:
        try:
            await handle.aclose()
        except Exception as error:  # closing is best effort; the process may be gone
            log.warning(
                "closing a tool source failed",
                source=type(handle.source).__name__,
                error=str(error),
            )


class RegistryHolder:
    """The registry in force now; pass it wherever a ``ToolRegistry`` is read.

    ``get``/``specs`` read ``current`` once per call, so each call is answered from one
    registry. ``swap`` installs a new registry (a reload) and retires the old one:
    sources the new registry reuses stay open, the others are closed once the old
    registry's longest tool timeout has passed (its in-flight calls are bounded by it).
    ``refresh`` rebuilds the current registry from its sources' tools now (a source
    answered or changed; every source of a registry in force calls it).
    """

    def __init__(self, registry: ToolRegistry) -> None:
        self.current = registry
        #: Retirements under way: the task waiting to close them, and the sources.
        self._retiring: dict[asyncio.Task[None], list[SourceHandle]] = {}
        self._closed = False
        self._adopt(registry)

    def get(self, name: str) -> Entry | None:
        return self.current.get(name)

    def specs(self) -> list[Spec]:
        return self.current.specs()

    def snapshot(self) -> ToolRegistry:
        return self.current

    @property
    def invalidation(self) -> InvalidationIndex:
        return self.current.invalidation

    def __contains__(self, name: object) -> bool:
        return name in self.current

    def __iter__(self) -> Iterator[str]:
        return iter(self.current)

    def __len__(self) -> int:
        return len(self.current)

    def swap(self, registry: ToolRegistry, *, retire_after: float | None = None) -> ToolRegistry:
        """Make ``registry`` current; close the old one's unused sources later."""
        if self._closed:
            raise RuntimeError("the registry holder is closed")
        old, self.current = self.current, registry
        self._adopt(registry)
        kept = {id(h.source) for h in registry.sources}
        stale = [h for h in old.sources if id(h.source) not in kept]
        if stale:
            delay = min(old.longest_timeout(), MAX_RETIRE_SECONDS)
            delay = delay if retire_after is None else retire_after
            task = asyncio.create_task(self._retire(stale, delay))
            self._retiring[task] = stale
            task.add_done_callback(lambda done: self._retiring.pop(done, None))
        return old

    def refresh(self) -> None:
        """Rebuild the current registry from its sources' tools as they are now."""
        if self._closed:
            return
        old, self.current = self.current, self.current.composed()
        self._publish(self.current)
        added, removed = set(self.current) - set(old), set(old) - set(self.current)
        if added or removed or old.version != self.current.version:
            log.info(
                "tool catalog changed",
                tools=len(self.current),
                added=sorted(added),
                removed=sorted(removed),
                version=self.current.version,
            )

    def _adopt(self, registry: ToolRegistry) -> None:
        for handle in registry.sources:
            handle.on_change = self.refresh
        self._publish(registry)

    @staticmethod
    def _publish(registry: ToolRegistry) -> None:
        """``trellis_tool_name_collisions`` of each source of the registry in force."""
        skipped = {handle.name: 0 for handle in registry.sources}
        for collision in registry.collisions:
            skipped[collision.skipped] = skipped.get(collision.skipped, 0) + 1
        for name, count in skipped.items():
            TOOL_NAME_COLLISIONS.labels(source=name).set(count)

    @staticmethod
    async def _retire(handles: list[SourceHandle], delay: float) -> None:
        await asyncio.sleep(delay)
        await close_sources(handles)

    async def aclose(self) -> None:
        """Close everything now: the current registry's sources and any being retired."""
        self._closed = True
        for task, handles in list(self._retiring.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await close_sources(handles)  # SourceHandle.aclose is safe to repeat
        await self.current.aclose()
