"""Batching (``batch:`` in the tools file) through the invoker, against a real HTTP
server that takes ``{"items": [...]}`` and answers ``{"results": [...]}``: the coalescing
window, max_items, per-item errors and missing results, per-item cache, single-flight
and idempotency before batching, the exact cost split, retries, callers that leave,
tenants kept apart, spans linked to the batch's, and the batch metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from tests.support.fake_cache import FakeCache
from tests.support.recording_outbox import RecordingOutbox
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.loader import LoadOptions, declared_tools, parse_tools_file
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.service import http_client
from trellis_toolgateway.tool_usage import ToolUsage
from trellis_toolgateway.tools.base import FunctionTool, Spec, ToolError

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED


@dataclass
class QuoteServer:
    """Prices by symbol; ``/batch`` takes many, ``/one`` one. Scriptable failures."""

    port: int = 0
    #: The items of each batch request, and the symbols of each single request.
    batches: list[list[dict[str, Any]]] = field(default_factory=list)
    singles: list[str] = field(default_factory=list)
    #: Statuses the next batch requests answer with before answering normally.
    batch_statuses: list[int] = field(default_factory=list)
    #: Answer this many results fewer than asked.
    short_by: int = 0
    #: Symbols whose item fails retryably the first time they are asked for.
    flaky: set[str] = field(default_factory=set)
    delay: float = 0.0

    def price(self, item: dict[str, Any]) -> dict[str, Any]:
        symbol = item["symbol"]
        if item.get("fail"):
            return {"error": {"code": "NO_SUCH_SYMBOL", "message": f"no {symbol}"}}
        if symbol in self.flaky:
            self.flaky.discard(symbol)
            return {"error": {"code": "QUOTE_BUSY", "message": "try again", "retryable": True}}
        return {"symbol": symbol, "price": len(symbol) * 10}

    def app(self) -> web.Application:
        async def batch(request: web.Request) -> web.Response:
            items = (await request.json())["items"]
            self.batches.append(items)
            await asyncio.sleep(self.delay)
            if self.batch_statuses:
                return web.json_response({"oops": True}, status=self.batch_statuses.pop(0))
            results = [self.price(item) for item in items]
            return web.json_response({"results": results[: len(results) - self.short_by]})

        async def one(request: web.Request) -> web.Response:
            item = await request.json()
            self.singles.append(item["symbol"])
            await asyncio.sleep(self.delay)
            answer = self.price(item)
            if "error" in answer:
                return web.json_response(
                    answer, status=503 if answer["error"].get("retryable") else 404
                )
            return web.json_response(answer)

        app = web.Application()
        app.router.add_post("/batch", batch)
        app.router.add_post("/one", one)
        return app


TOOLS = """
version: 1
tools:
  - name: quote
    kind: http
    method: POST
    url: http://127.0.0.1:{port}/one
    batch_url: http://127.0.0.1:{port}/batch
    allowed_hosts: ["127.0.0.1:{port}"]
    body_args: [symbol, fail]
    side_effects: {side_effects}
    cache_ttl: {cache_ttl}
    retries: {retries}
    cost_nano_usd: 40
    input_schema:
      type: object
      properties: {{symbol: {{type: string}}, fail: {{type: boolean}}}}
      required: [symbol]
    batch: {{max_items: {max_items}, max_wait_ms: {wait_ms}, cost_nano_usd: 100}}
"""


@pytest.fixture
async def quotes(http_app) -> QuoteServer:
    server = QuoteServer()
    server.port = await http_app(server.app())
    return server


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@dataclass
class Gateway:
    invoker: Invoker
    cache: FakeCache
    outbox: RecordingOutbox

    async def call(self, symbol: str, node: str = "", **extra: Any) -> common_pb2.NodeOutcome:
        key = extra.pop("idempotency_key", "")
        args = {"symbol": symbol, **extra}
        return await self.invoker.invoke(
            Call("quote", args, node_id=node or symbol), run_id="r1", idempotency_key=key
        )

    async def many(self, *symbols: str, **extra: Any) -> list[common_pb2.NodeOutcome]:
        return list(await asyncio.gather(*(self.call(s, **extra) for s in symbols)))


@pytest.fixture
async def make_gateway(
    quotes: QuoteServer, spans: InMemorySpanExporter, tmp_path: Path
) -> AsyncIterator:
    clients = []

    def make(
        *,
        max_items: int = 4,
        wait_ms: int = 60,
        cache_ttl: int = 0,
        retries: int = 0,
        side_effects: bool = False,
    ) -> Gateway:
        text = TOOLS.format(
            port=quotes.port,
            max_items=max_items,
            wait_ms=wait_ms,
            cache_ttl=cache_ttl,
            retries=retries,
            side_effects=str(side_effects).lower(),
        )
        client = http_client()
        clients.append(client)
        registry = declared_tools(
            parse_tools_file(text, "tools.yaml"),
            tmp_path / "tools.yaml",
            LoadOptions(http_client=client),
        )
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        cache, outbox = FakeCache(), RecordingOutbox()
        invoker = Invoker(registry, cache, provider.get_tracer("test"), usage=ToolUsage(outbox))
        return Gateway(invoker, cache, outbox)

    yield make
    for client in clients:
        await client.aclose()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def output(outcome: common_pb2.NodeOutcome) -> Any:
    return from_value(outcome.output)


async def test_calls_in_one_window_are_one_request_and_each_gets_its_result(
    make_gateway, quotes
) -> None:
    gateway = make_gateway()
    size_sum = sample("trellis_tool_batch_size_sum", tool="quote")
    batches = sample("trellis_tool_batches_total", tool="quote")
    items = sample("trellis_tool_batch_items_total", tool="quote")
    outcomes = await gateway.many("AB", "CDE", "F")
    assert quotes.batches == [[{"symbol": "AB"}, {"symbol": "CDE"}, {"symbol": "F"}]]
    assert quotes.singles == []
    assert [output(o) for o in outcomes] == [
        {"symbol": "AB", "price": 20},
        {"symbol": "CDE", "price": 30},
        {"symbol": "F", "price": 10},
    ]
    assert [(o.node_id, o.status, o.attempts) for o in outcomes] == [
        ("AB", SUCCEEDED, 1),
        ("CDE", SUCCEEDED, 1),
        ("F", SUCCEEDED, 1),
    ]
    assert sample("trellis_tool_batch_size_sum", tool="quote") - size_sum == 3
    assert sample("trellis_tool_batches_total", tool="quote") - batches == 1
    assert sample("trellis_tool_batch_items_total", tool="quote") - items == 3


async def test_a_call_alone_in_its_window_is_an_ordinary_call(make_gateway, quotes) -> None:
    gateway = make_gateway(wait_ms=20)
    first = await gateway.call("AB")
    second = await gateway.call("CD")  # the first window closed long ago
    assert quotes.batches == [] and quotes.singles == ["AB", "CD"]
    assert output(first) == {"symbol": "AB", "price": 20}
    assert first.cost_nano_usd == second.cost_nano_usd == 40  # a single call's own cost


async def test_a_full_batch_goes_at_once_and_the_rest_waits_for_its_window(
    make_gateway, quotes
) -> None:
    gateway = make_gateway(max_items=4, wait_ms=300)
    started = asyncio.get_running_loop().time()
    first = asyncio.gather(*(gateway.call(f"S{i}") for i in range(8)))
    outcomes = await first
    full_after = asyncio.get_running_loop().time() - started
    assert [len(b) for b in quotes.batches] == [4, 4]
    assert full_after < 0.25  # full batches did not wait for the 300 ms window
    assert all(o.status == SUCCEEDED for o in outcomes)
    quotes.batches.clear()
    outcomes = await gateway.many(*(f"T{i}" for i in range(10)))
    assert sorted(len(b) for b in quotes.batches) == [2, 4, 4]
    assert [output(o)["symbol"] for o in outcomes] == [f"T{i}" for i in range(10)]


async def test_one_items_error_fails_only_its_node(make_gateway, quotes) -> None:
    gateway = make_gateway()
    ok, bad, also_ok = await asyncio.gather(
        gateway.call("AB"), gateway.call("XX", fail=True), gateway.call("CDE")
    )
    assert len(quotes.batches) == 1
    assert (ok.status, also_ok.status) == (SUCCEEDED, SUCCEEDED)
    assert (bad.status, bad.error.code, bad.error.retryable) == (FAILED, "NO_SUCH_SYMBOL", False)
    assert bad.error.message == "no XX"


async def test_items_a_short_answer_lacks_fail_batch_result_missing(make_gateway, quotes) -> None:
    gateway = make_gateway()
    quotes.short_by = 1
    outcomes = await gateway.many("AB", "CD", "EF")
    assert [o.status for o in outcomes] == [SUCCEEDED, SUCCEEDED, FAILED]
    assert outcomes[2].error.code == "BATCH_RESULT_MISSING"
    assert "2 results for 3 calls" in outcomes[2].error.message


async def test_the_batch_cost_is_split_exactly_and_each_node_has_its_row(
    make_gateway, quotes
) -> None:
    gateway = make_gateway()
    outcomes = await gateway.many("AB", "CD", "EF")
    assert [o.cost_nano_usd for o in outcomes] == [34, 33, 33]  # 100 for the request
    rows = sorted(gateway.outbox.rows, key=lambda r: r.node_id)
    assert [(r.node_id, r.tool, r.tool_cost_nano_usd) for r in rows] == [
        ("AB", "quote", 34),
        ("CD", "quote", 33),
        ("EF", "quote", 33),
    ]
    assert sum(r.tool_cost_nano_usd for r in rows) == 100
    assert len({r.usage_id for r in rows}) == 3
    assert all(r.usage_id.startswith(f"r1/{r.node_id}/tool/") for r in rows)


async def test_a_failed_request_is_retried_for_its_items(make_gateway, quotes) -> None:
    gateway = make_gateway(retries=1)
    quotes.batch_statuses = [503]
    outcomes = await gateway.many("AB", "CD")
    assert [len(b) for b in quotes.batches] == [2, 2]  # the whole request, twice
    assert [(o.status, o.attempts, o.cost_nano_usd) for o in outcomes] == [
        (SUCCEEDED, 2, 100),  # its share of two requests of 100
        (SUCCEEDED, 2, 100),
    ]
    quotes.batches.clear()
    quotes.batch_statuses = [503, 503]
    outcomes = await gateway.many("GH", "IJ")
    assert [(o.status, o.error.code, o.attempts) for o in outcomes] == [
        (FAILED, "HTTP_5XX", 2),
        (FAILED, "HTTP_5XX", 2),
    ]


async def test_only_the_items_that_failed_retryably_are_sent_again(make_gateway, quotes) -> None:
    gateway = make_gateway(retries=2)
    quotes.flaky = {"CD"}
    outcomes = await gateway.many("AB", "CD", "EF")
    assert [len(b) for b in quotes.batches] == [3]
    assert quotes.singles == ["CD"]  # alone in the retry: an ordinary call
    assert [(o.status, o.attempts) for o in outcomes] == [
        (SUCCEEDED, 1),
        (SUCCEEDED, 2),
        (SUCCEEDED, 1),
    ]
    assert [o.cost_nano_usd for o in outcomes] == [34, 33 + 40, 33]


async def test_cache_and_single_flight_come_before_batching(make_gateway, quotes) -> None:
    gateway = make_gateway(cache_ttl=60)
    await gateway.many("AB", "CD")
    assert quotes.batches == [[{"symbol": "AB"}, {"symbol": "CD"}]]
    quotes.batches.clear()
    outcomes = await asyncio.gather(
        gateway.call("AB", node="n1"),  # cached
        gateway.call("EF", node="n2"),
        gateway.call("EF", node="n3"),  # the same call: one flight
        gateway.call("GH", node="n4"),
        gateway.call("CD", node="n5"),  # cached
    )
    assert quotes.batches == [[{"symbol": "EF"}, {"symbol": "GH"}]]  # only misses, once each
    assert [o.cache_hit for o in outcomes] == [True, False, True, False, True]
    assert [o.attempts for o in outcomes] == [0, 1, 0, 1, 0]
    assert output(outcomes[2]) == output(outcomes[1]) == {"symbol": "EF", "price": 20}


async def test_side_effecting_items_run_once_per_idempotency_key(make_gateway, quotes) -> None:
    gateway = make_gateway(side_effects=True)
    first = await asyncio.gather(
        *(gateway.call(s, node=f"n{i}", idempotency_key=f"r1/n{i}") for i, s in enumerate("ABC"))
    )
    assert [len(b) for b in quotes.batches] == [3]
    again = await asyncio.gather(
        *(gateway.call(s, node=f"n{i}", idempotency_key=f"r1/n{i}") for i, s in enumerate("ABC"))
    )
    assert [len(b) for b in quotes.batches] == [3]  # replays: the backend saw each key once
    assert [output(o) for o in again] == [output(o) for o in first]
    assert len(gateway.outbox.rows) == 3  # replays ran nothing and cost nothing


async def test_a_caller_that_leaves_before_the_request_is_taken_out(make_gateway, quotes) -> None:
    gateway = make_gateway(wait_ms=200)
    leaving = asyncio.create_task(gateway.call("GONE"))
    staying = [asyncio.create_task(gateway.call(s)) for s in ("AB", "CD")]
    await asyncio.sleep(0.05)
    leaving.cancel()
    outcomes = await asyncio.gather(*staying)
    assert quotes.batches == [[{"symbol": "AB"}, {"symbol": "CD"}]]
    assert all(o.status == SUCCEEDED for o in outcomes)


async def test_tenants_are_never_batched_together(make_gateway, quotes) -> None:
    gateway = make_gateway()

    async def as_tenant(tenant: str, symbol: str) -> common_pb2.NodeOutcome:
        with context.request_scope(tenant_id=tenant):
            return await gateway.call(symbol)

    await asyncio.gather(
        as_tenant("acme", "AB"), as_tenant("globex", "CD"), as_tenant("acme", "EF")
    )
    assert sorted(len(b) for b in quotes.batches) == [2]
    assert quotes.singles == ["CD"]
    assert sorted(i["symbol"] for i in quotes.batches[0]) == ["AB", "EF"]


async def test_each_calls_span_links_to_the_batch_span(make_gateway, spans) -> None:
    gateway = make_gateway()
    await gateway.many("AB", "CD", "EF")
    finished = spans.get_finished_spans()
    (batch,) = [s for s in finished if s.name == "tool_batch quote"]
    calls = [s for s in finished if s.name == "execute_tool quote"]
    assert len(calls) == 3 and batch.attributes["trellis.batch.size"] == 3
    assert {link.context.span_id for link in batch.links} == {c.context.span_id for c in calls}
    for call in calls:
        assert [link.context.span_id for link in call.links] == [batch.context.span_id]
    assert batch.parent is not None and batch.parent.span_id in {c.context.span_id for c in calls}


async def test_a_tool_without_run_batch_is_called_one_by_one_and_fails_alone() -> None:
    seen: list[str] = []

    async def shout(args: dict[str, Any]) -> Any:
        seen.append(args["text"])
        if args["text"] == "boom":
            raise ToolError("NO_SHOUTING", "not that one")
        return args["text"].upper()

    schema = {"type": "object", "properties": {"text": {"type": "string"}}}
    spec = Spec("shout", "upper-cases", schema, {}, batch_max_items=4, batch_max_wait=0.05)
    invoker = Invoker(ToolRegistry([FunctionTool(spec, shout)]), None, trace.get_tracer(__name__))
    outcomes = await asyncio.gather(
        *(invoker.invoke(Call("shout", {"text": t}, node_id=t)) for t in ("a", "boom", "c"))
    )
    assert sorted(seen) == ["a", "boom", "c"]
    assert [o.status for o in outcomes] == [SUCCEEDED, FAILED, SUCCEEDED]
    assert [output(outcomes[0]), outcomes[1].error.code] == ["A", "NO_SHOUTING"]
