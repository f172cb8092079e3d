"""The set of tools one gateway serves, and the holder that swaps it on reload.

Schemas are checked and compiled once, when a tool is registered, so a bad schema is
a load error instead of failing calls, and each call only validates. A registry is
immutable once loaded: a reload builds a whole new one and ``RegistryHolder.swap``
replaces it in one assignment, so a call sees either the old set or the new set, never
a mix, and a call already running keeps the ``Entry`` it looked up. The tool sources
(MCP servers, remote tool servers) a registry brought are closed when it is replaced,
after its calls have had time to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from jsonschema import Draft202012Validator

from trellis.runtime.logs import get_logger
from trellis.runtime.validation import TOOL_NAME
from trellis_toolgateway.invalidation import InvalidationIndex
from trellis_toolgateway.tools.base import Spec, Tool, ToolSource
from trellis_toolgateway.tools.config import WarmCall

log = get_logger(__name__)

#: Longest wait before closing the sources of a replaced registry.
MAX_RETIRE_SECONDS = 300.0


@dataclass(frozen=True)
class Entry:
    tool: Tool
    args_validator: Draft202012Validator
    output_validator: Draft202012Validator


@dataclass(frozen=True)
class SourceHandle:
    """A tool source and the tools-file entry it was made from (to reuse it on reload)."""

    key: object
    source: ToolSource


class ToolLookup(Protocol):
    """What the invoker and servicer need: a ``ToolRegistry`` or a ``RegistryHolder``."""

    def get(self, name: str) -> Entry | None: ...

    def specs(self) -> list[Spec]: ...

    @property
    def invalidation(self) -> InvalidationIndex: ...


class ToolRegistry:
    """Tools by name. Names are unique (registering a name twice is a bug) and follow
    ``TOOL_NAME``: a source's tool named otherwise is skipped, as calls could not name it."""

    def __init__(self, tools: Sequence[Tool] | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        self.sources: list[SourceHandle] = []
        #: Calls to make so their results are cached (the tools file's ``warm``).
        self.warm: list[WarmCall] = []
        self._invalidation: InvalidationIndex | None = None
        for tool in tools or ():
            self.register(tool)

    def register(self, tool: Tool) -> None:
        name = tool.spec.name
        if (problem := TOOL_NAME.problem(name, required=True)) is not None:
            raise ValueError(f"tool name: {problem}")  # it could never be called
        if name in self._entries:
            raise ValueError(f"tool {name!r} is registered twice")
        for which in ("input_schema", "output_schema"):
            # SchemaError names the broken keyword.
            Draft202012Validator.check_schema(getattr(tool.spec, which))
        self._entries[name] = Entry(
            tool,
            Draft202012Validator(tool.spec.input_schema),
            Draft202012Validator(tool.spec.output_schema),
        )
        self._invalidation = None

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def specs(self) -> list[Spec]:
        return [e.tool.spec for e in self._entries.values()]

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
        await close_sources([h.source for h in self.sources])


async def close_sources(sources: Sequence[ToolSource]) -> None:
    for source in sources:
        try:
            await source.aclose()
        except Exception as error:  # closing is best effort; the process may be gone
            log.warning(
                "closing a tool source failed", source=type(source).__name__, error=str(error)
            )


class RegistryHolder:
    """The registry in force now; pass it wherever a ``ToolRegistry`` is read.

    ``get``/``specs`` read ``current`` once per call, so each call is answered from one
    registry. ``swap`` installs a new registry and retires the old one: sources the new
    registry reuses stay open, the others are closed once the old registry's longest
    tool timeout has passed (its in-flight calls are bounded by it).
    """

    def __init__(self, registry: ToolRegistry) -> None:
        self.current = registry
        #: Retirements under way: the task waiting to close them, and the sources.
        self._retiring: dict[asyncio.Task[None], list[ToolSource]] = {}
        self._closed = False

    def get(self, name: str) -> Entry | None:
        return self.current.get(name)

    def specs(self) -> list[Spec]:
        return self.current.specs()

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
        kept = {id(h.source) for h in registry.sources}
        stale = [h.source for h in old.sources if id(h.source) not in kept]
        if stale:
            delay = min(old.longest_timeout(), MAX_RETIRE_SECONDS)
            delay = delay if retire_after is None else retire_after
            task = asyncio.create_task(self._retire(stale, delay))
            self._retiring[task] = stale
            task.add_done_callback(lambda done: self._retiring.pop(done, None))
        return old

    @staticmethod
    async def _retire(sources: list[ToolSource], delay: float) -> None:
        await asyncio.sleep(delay)
        await close_sources(sources)

    async def aclose(self) -> None:
        """Close everything now: the current registry's sources and any being retired."""
        self._closed = True
        for task, sources in list(self._retiring.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await close_sources(sources)  # ToolSource.aclose is safe to repeat
        await self.current.aclose()
