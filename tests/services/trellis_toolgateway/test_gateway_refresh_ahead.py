"""Refresh-ahead: a hit in the last part of an entry's TTL is answered at once and
refreshes the entry in the background, once per window, never for side-effecting tools.

The cache is the cache service's ``MemoryStore`` on a clock the test moves, so "three
TTLs of continuous reads" take no real time and every count is exact.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from tests.support.store_cache import StoreCache
from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_value
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.refresh_ahead import RefreshAhead, refresh_due
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import FunctionTool, Spec, ToolError

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
TTL, FRACTION = 10.0, 0.2
OBJ = {"type": "object"}


class Hot:
    """A cacheable tool with refresh-ahead that counts its runs; ``gate`` holds runs
    after the first until the test opens it, ``fail_from`` makes runs fail."""

    def __init__(self, *, side_effects: bool = False, fail_from: int = 0) -> None:
        self.runs = 0
        self.gate = asyncio.Event()
        self.gate.set()
        #: Set once a run (after the first) reached the gate.
        self.at_gate = asyncio.Event()
        self.fail_from = fail_from
        spec = Spec(
            "hot", "a hot key", OBJ, OBJ, cache_ttl=TTL, refresh_ahead=FRACTION,
            side_effects=side_effects,
        )  # fmt: skip
        self.tool = FunctionTool(spec, self._run)

    async def _run(self, args: dict) -> dict:
        self.runs += 1
        run = self.runs
        if run > 1:
            self.at_gate.set()
            await self.gate.wait()
        if self.fail_from and run >= self.fail_from:
            raise ToolError("BACKEND_DOWN", "down")
        return {"run": run}


class Usage:
    def __init__(self) -> None:
        self.runs: list[str] = []

    def executed(self, *, tool: str, run_id: str, node_id: str, outcome, model_tool=False) -> None:
        self.runs.append(run_id)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(spans: InMemorySpanExporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("test")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def hit(invoker: Invoker) -> common_pb2.NodeOutcome:
    return await invoker.invoke(Call("hot", {"q": 1}, node_id="n"), run_id="run-1")


async def test_a_hot_key_read_for_three_ttls_stays_hot_with_one_refresh_per_window(
    tracer,
) -> None:
    hot, cache = Hot(), StoreCache()
    invoker = Invoker(ToolRegistry([hot.tool]), cache, tracer)
    assert not (await hit(invoker)).cache_hit  # the only miss: the key was cold
    seen, stored_at = [], [cache.clock.now]
    for _ in range(300):  # a read every 0.1 s for 30 s: three TTLs
        cache.clock.advance(0.1)
        outcome = await hit(invoker)
        assert outcome.cache_hit and outcome.status == SUCCEEDED, outcome
        seen.append(from_value(outcome.output)["run"])
        runs = hot.runs
        await invoker.settled()
        if hot.runs > runs or cache.sets > len(stored_at):
            stored_at.append(cache.clock.now)
    # Each entry was refreshed once, when reads entered the last 2 s of its 10 s, so
    # the backend ran once for the cold key and once per window: at ~8, ~16, ~24 s.
    assert hot.runs == 4, stored_at
    assert [round(b - a, 1) for a, b in itertools.pairwise(stored_at)] == [8.0, 8.0, 8.0]
    assert seen == sorted(seen) and set(seen) == {1, 2, 3, 4}


async def test_while_a_refresh_runs_hits_in_the_window_start_no_other(tracer) -> None:
    hot, cache = Hot(), StoreCache()
    invoker = Invoker(ToolRegistry([hot.tool]), cache, tracer)
    await hit(invoker)
    hot.gate.clear()  # the refresh will hang until the gate opens
    cache.clock.advance(TTL - 1)  # in the window
    marked = [(await hit(invoker)).cache_refreshing for _ in range(20)]
    assert marked == [True] * 20
    assert hot.runs == 2  # the first run and one refresh, holding
    hot.gate.set()
    await invoker.settled()
    after = await hit(invoker)
    assert (after.cache_hit, after.cache_refreshing, from_value(after.output)) == (
        True,
        False,
        {"run": 2},
    )
    assert hot.runs == 2


def test_a_read_that_started_before_the_refresh_was_stored_starts_no_second() -> None:
    schedule = RefreshAhead()
    early = schedule.ticket()  # a read under way while the refresh runs
    assert schedule.claim("k", schedule.ticket())
    assert not schedule.claim("k", early)  # running
    schedule.stored("k")
    assert not schedule.claim("k", early)  # it read the old entry, now replaced
    assert schedule.claim("k", schedule.ticket())  # a read of the new entry's window
    assert schedule.running == 1


def test_the_window_is_the_last_fraction_of_the_ttl() -> None:
    assert refresh_due(0.2, 10, 2.0) and refresh_due(0.2, 10, 0.1)
    assert not refresh_due(0.2, 10, 2.01)
    assert not refresh_due(0.0, 10, 0.1)


async def test_the_refreshing_hit_is_marked_on_outcome_span_and_metrics(
    tracer, spans: InMemorySpanExporter
) -> None:
    hot, cache, usage = Hot(), StoreCache(), Usage()
    invoker = Invoker(ToolRegistry([hot.tool]), cache, tracer, usage=usage)
    stale_before = sample("trellis_cache_stale_served_total", tool="hot")
    refreshed_before = sample("trellis_cache_refreshes_total", tool="hot", outcome="refreshed")
    await hit(invoker)
    cache.clock.advance(TTL - 1)
    outcome = await hit(invoker)
    await invoker.settled()
    assert (outcome.cache_hit, outcome.cache_refreshing) == (True, True)
    assert (outcome.attempts, outcome.cost_nano_usd) == (0, 0)  # the run paid nothing
    assert sample("trellis_cache_stale_served_total", tool="hot") == stale_before + 1
    labels = {"tool": "hot", "outcome": "refreshed"}
    assert sample("trellis_cache_refreshes_total", **labels) == refreshed_before + 1
    served, refresh = [s for s in spans.get_finished_spans() if s.name == "execute_tool hot"][
        1:
    ]  # the first call's, the refreshing hit's, the background refresh's
    assert served.attributes["trellis.cache.refreshing"] is True
    assert served.attributes["trellis.cache_hit"] is True
    assert refresh.attributes["trellis.cache.refresh"] == "background"
    assert refresh.parent is not None and refresh.parent.span_id == served.context.span_id
    # the refresh ran outside the run that hit: its usage is the tenant's, no run's
    assert usage.runs == ["run-1", ""]


async def test_a_failed_refresh_is_not_retried_by_every_hit(tracer) -> None:
    hot, cache = Hot(fail_from=2), StoreCache()
    invoker = Invoker(ToolRegistry([hot.tool]), cache, tracer)
    failed_before = sample("trellis_cache_refreshes_total", tool="hot", outcome="failed")
    await hit(invoker)
    cache.clock.advance(TTL - 1)
    for _ in range(10):
        outcome = await hit(invoker)
        assert outcome.cache_hit and from_value(outcome.output) == {"run": 1}
        await invoker.settled()
    assert hot.runs == 2  # one refresh tried; the old entry is served until it expires
    assert sample("trellis_cache_refreshes_total", tool="hot", outcome="failed") == (
        failed_before + 1
    )
    cache.clock.advance(1.5)  # expired: a miss runs the tool (and fails, uncached)
    assert not (await hit(invoker)).cache_hit
    assert hot.runs == 3


async def test_side_effecting_tools_are_never_refreshed(tracer) -> None:
    hot, cache = Hot(side_effects=True), StoreCache()
    invoker = Invoker(ToolRegistry([hot.tool]), cache, tracer)
    for _ in range(3):
        outcome = await hit(invoker)
        cache.clock.advance(TTL - 1)
        await invoker.settled()
        assert (outcome.cache_hit, outcome.cache_refreshing) == (False, False)
    assert (hot.runs, cache.sets) == (3, 0)


async def test_close_cancels_a_refresh_under_way(tracer) -> None:
    hot, cache = Hot(), StoreCache()
    invoker = Invoker(ToolRegistry([hot.tool]), cache, tracer)
    await hit(invoker)
    hot.gate.clear()
    cache.clock.advance(TTL - 1)
    await hit(invoker)
    await hot.at_gate.wait()  # the refresh has reached the tool, and hangs there
    await invoker.aclose()
    assert cache.sets == 1  # the hanging refresh stored nothing
