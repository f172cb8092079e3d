"""Tool sources kept current: what each serves now, and whether it is up.

A source (an MCP server, a remote tool server) is listed in the background by its
``SourceHandle``, never on a call's path:

- at load, the loader waits a bounded time (TRELLIS_TOOL_SOURCE_LIST_SECONDS) for each new
  source's first answer; a source slower than that (``npx -y``/``uvx`` on a cold cache) is
  not skipped: its handle keeps trying, with exponential backoff and jitter up to
  TRELLIS_TOOL_SOURCE_RETRY_MAX_SECONDS, each attempt bounded by the connect and listing
  times, and its tools join the catalog the moment it answers, without a reload;
- a source that says its tools changed (MCP ``notifications/tools/list_changed``) or that
  went away (a stdio server exited) is listed again at once, which also reconnects;
- a source that stops answering keeps its last tools in the catalog (calls fail with a
  retryable error until it is back, rather than plans naming them being refused), and
  is shown ``down``.

Each listing that succeeds calls ``on_change`` (the registry holder rebuilds the catalog
from every source's current tools). The state is what ListTools shows per source and
``trellis_tool_source_up{source}`` exports (1 up, 0 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from jsonschema import SchemaError

from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import TOOL_NAME_COLLISIONS, TOOL_SOURCE_UP
from trellis.runtime.redact import redact_text
from trellis_toolgateway.entries import Entry, entry_of
from trellis_toolgateway.policy.retry import Backoff
from trellis_toolgateway.tools.base import Tool, ToolSource


def _log() -> structlog.stdlib.BoundLogger:
    """A fresh logger per event (they are rare: a source coming up or going down), so log
    capture in tests sees them however logging was set up before."""
    return get_logger(__name__)


#: Longest error text kept for ListTools.
MAX_ERROR_CHARS = 500

#: Which handle currently shows each source's gauges (a reload may replace a handle by
#: another of the same name before the old one is closed).
_SHOWN: dict[str, int] = {}


class SourceState(enum.StrEnum):
    #: Not answered yet: the first listing is under way.
    CONNECTING = "connecting"
    #: Its last listing succeeded.
    UP = "up"
    #: Its last listing failed (or it went away); listed again with backoff.
    DOWN = "down"


@dataclass(frozen=True)
class SourceTimings:
    """How a source is listed (TRELLIS_TOOL_SOURCE_* settings)."""

    #: Longest a source may take to start and answer (MCP ``initialize``).
    connect: float = 60.0
    #: Longest a load waits for a new source's first answer; also the bound of listing
    #: once connected.
    list_wait: float = 10.0
    #: Delay between failed listings: exponential, full jitter, capped.
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=1.0, maximum=60.0))

    @property
    def attempt(self) -> float:
        """Bound of one listing attempt, connecting included."""
        return self.connect + self.list_wait


def _identity(tool: Tool) -> Tool:
    return tool


class SourceHandle:
    """A tool source, the tools (entries) it serves now, and the task keeping them current.

    ``start()`` begins listing; ``first_listing(bound)`` waits for the first attempt's
    outcome; ``aclose()`` stops listing and closes the source. ``prepare`` finishes each
    listed tool before it is checked (the loader's output cap).
    """

    def __init__(
        self,
        key: object,
        source: ToolSource,
        *,
        name: str | None = None,
        prepare: Callable[[Tool], Tool] = _identity,
        timings: SourceTimings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.key = key
        self.source = source
        self.name = name or str(getattr(source, "name", type(source).__name__))
        self.state = SourceState.CONNECTING
        #: Why the last listing failed (redacted, bounded); "" when up.
        self.error = ""
        #: The tools it serves now (its last successful listing).
        self.entries: list[Entry] = []
        #: Successful listings so far.
        self.listings = 0
        #: Called after each successful listing (the registry holder rebuilds the catalog).
        self.on_change: Callable[[], None] | None = None
        self._prepare = prepare
        self._timings = timings or SourceTimings()
        self._rng = rng or random.Random()
        self._attempted = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def kind(self) -> str:
        return self.source.kind

    def start(self) -> None:
        """List in the background from now on (idempotent)."""
        if self._task is None and not self._closed:
            self.source.watch(self._wake.set)
            self._show(0)
            self._task = asyncio.create_task(self._keep_current(), name=f"source:{self.name}")

    async def first_listing(self, bound: float) -> None:
        """Wait up to ``bound`` seconds for the first listing attempt to end."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await self._attempted.wait()

    async def aclose(self) -> None:
        """Stop listing and close the source (each once; safe to repeat)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if _SHOWN.get(self.name) == id(self):
            del _SHOWN[self.name]
            for gauge in (TOOL_SOURCE_UP, TOOL_NAME_COLLISIONS):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.name)
        await self.source.aclose()

    async def _keep_current(self) -> None:
        loop = asyncio.get_running_loop()
        failures = rapid = 0
        while True:
            self._wake.clear()  # a change noticed from here on means: list again after this
            try:
                async with asyncio.timeout(self._timings.attempt):
                    tools = await self.source.tools()
            except Exception as error:
                failures += 1
                self._failed(error, failures)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._timings.backoff.delay(failures, self._rng)):
                        await self._wake.wait()
                continue
            failures = 0
            self._listed(tools)
            listed_at = loop.time()
            await self._wake.wait()
            # Changes in quick succession (a server that crashes as soon as it is up, a
            # burst of notices) are coalesced behind a growing delay.
            rapid = rapid + 1 if loop.time() - listed_at < self._timings.backoff.initial else 0
            if rapid:
                await asyncio.sleep(self._timings.backoff.delay(rapid, self._rng))

    def _listed(self, tools: list[Tool]) -> None:
        entries = []
        for tool in tools:
            try:
                entries.append(entry_of(self._prepare(tool)))
            except (ValueError, SchemaError) as error:
                message = error.message if isinstance(error, SchemaError) else str(error)
                _log().warning(
                    "tool of a source skipped", source=self.name, tool=tool.spec.name, error=message
                )
        if self.state is not SourceState.UP:
            _log().info("tool source up", source=self.name, tools=len(entries))
        self.entries, self.state, self.error = entries, SourceState.UP, ""
        self.listings += 1
        self._attempted.set()
        self._show(1)
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # a bug there must not end this source's listing for good
                _log().exception("rebuilding the tool catalog failed", source=self.name)

    def _failed(self, error: Exception, failures: int) -> None:
        text = "no answer in time" if isinstance(error, TimeoutError) else str(error)
        text = redact_text(f"{type(error).__name__}: {text}")[:MAX_ERROR_CHARS]
        if self.state is not SourceState.DOWN:
            _log().warning(
                "tool source unavailable; listing it again in the background",
                source=self.name,
                error=text,
                kept_tools=len(self.entries),
            )
        self.state, self.error = SourceState.DOWN, text
        self._attempted.set()
        self._show(0)

    def _show(self, up: int) -> None:
        _SHOWN[self.name] = id(self)
        TOOL_SOURCE_UP.labels(source=self.name).set(up)
