"""Model and embed tools end to end: the gateway's invoker calls a real planner service
(Generate, Embed) over gRPC, which calls the offline model through the openai client and
records usage in a real cost-accounting service (SQLite ledger, read back here).

Structured output, text output, the cache (deterministic tools only; the key covers the
model and rendered prompt), usage on the outcome and in the ledger under
``{run}/{node}/model``, failures that still report what they spent, the budget, ten
calls at once under the planner's rate limit, and batches: one request for many nodes,
its tokens split exactly, items the answer lacks asked again on their own, embeddings
in one request."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from prometheus_client import REGISTRY

from tests.support.fake_cache import FakeCache
from tests.support.model_script import script_of
from tests.support.recording_outbox import RecordingOutbox
from trellis.clients.costs import CostsClient
from trellis.clients.planner import PlannerClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime.convert import from_value
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings
from trellis_offline_model.server import prompt_tokens
from trellis_offline_model.tokens import count_tokens
from trellis_planner import service as planner_service
from trellis_planner.ratelimit import InProcessRateLimiter, Limit, RateLimits
from trellis_planner.settings import PlannerSettings
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.loader import (
    LoadOptions,
    ToolsFileError,
    declared_tools,
    parse_tools_file,
)
from trellis_toolgateway.tool_usage import ToolUsage

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
#: The offline model's bundled prices, nano-USD per token.
INPUT_NANO, OUTPUT_NANO, EMBED_NANO = 150, 600, 20

SUMMARY_SCHEMA = """
    output_schema:
      type: object
      properties: {summary: {type: string}, words: {type: integer}}
      required: [summary, words]
      additionalProperties: false"""

TOOLS = f"""
version: 1
tools:
  - name: summarize
    kind: model
    description: Summarise a text in one sentence.
    input_schema:
      type: object
      properties: {{text: {{type: string}}}}
      required: [text]
{SUMMARY_SCHEMA}
    prompt:
      - {{role: system, content: "Summarise the user's text in one sentence."}}
      - {{role: user, content: "{{text}}"}}
    temperature: 0
    max_output_tokens: 200
    cache_ttl: 600
    retries: 1
  - name: summarize_many
    kind: model
    input_schema:
      type: object
      properties: {{text: {{type: string}}}}
      required: [text]
{SUMMARY_SCHEMA}
    prompt:
      - {{role: system, content: "Summarise the user's text in one sentence."}}
      - {{role: user, content: "{{text}}"}}
    batch: {{max_items: 8, max_wait_ms: 80}}
  - name: chat
    kind: model
    input_schema:
      type: object
      properties: {{question: {{type: string}}}}
    prompt:
      - {{role: user, content: "{{question}}"}}
  - name: embed
    kind: embed
    batch: {{max_items: 16, max_wait_ms: 80}}
"""


@pytest.fixture
async def costs(serve, tmp_path: Path) -> str:
    settings = CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{tmp_path}/costs.db")
    return (await serve("costs", build_costs, settings)).target


@pytest.fixture
def ledger(tmp_path: Path) -> Callable[[str], list[dict[str, Any]]]:
    """The ledger's rows of a run, by usage id."""

    def read(run_id: str) -> list[dict[str, Any]]:
        with sqlite3.connect(tmp_path / "costs.db") as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM usage WHERE run_id = ? ORDER BY usage_id", (run_id,)
            ).fetchall()
        return [dict(row) for row in rows]

    return read


async def start_planner(serve, channels, model, costs: str) -> PlannerClient:
    settings = PlannerSettings(
        port=0, metrics_port=0, openai_base_url=model.base_url, costs_target=costs
    )
    server = await serve(planner_service.NAME, planner_service.build, settings)
    return PlannerClient(channels.get(server.target), timeout=30)


@pytest.fixture
async def planner(serve, channels, model, costs) -> PlannerClient:
    return await start_planner(serve, channels, model, costs)


def registry_of(planner: PlannerClient | None, text: str = TOOLS, tmp: Path = Path(".")):
    return declared_tools(
        parse_tools_file(text, "tools.yaml"), tmp / "tools.yaml", LoadOptions(model_access=planner)
    )


@pytest.fixture
def cache() -> FakeCache:
    return FakeCache()


@pytest.fixture
def invoker(planner, cache) -> Invoker:
    return Invoker(registry_of(planner), cache, trace.get_tracer(__name__))


def call(tool: str, node: str, **args: Any) -> Call:
    return Call(tool, args, node_id=node)


def usage_of(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["input_tokens"], row["output_tokens"], row["cost_nano_usd"]


def reported(outcome: common_pb2.NodeOutcome) -> tuple[int, int, int]:
    usage = outcome.usage
    return usage.input_tokens, usage.output_tokens, usage.cost_nano_usd


TEXT = "Trellis runs agents as a DAG. Nodes start as soon as their inputs exist."


async def test_structured_output_is_the_parsed_object_and_the_node_reports_its_tokens(
    invoker, model, ledger
) -> None:
    outcome = await invoker.invoke(call("summarize", "n1", text=TEXT), run_id="r1")
    assert outcome.status == SUCCEEDED, outcome.error
    assert from_value(outcome.output) == {"summary": "Trellis runs agents as a DAG.", "words": 14}
    (request,) = model.requests
    assert request["response_format"]["type"] == "json_schema"
    schema = request["response_format"]["json_schema"]
    assert (schema["name"], schema["strict"]) == ("summarize", True)
    assert schema["schema"]["required"] == ["summary", "words"]
    assert (request["temperature"], request["max_completion_tokens"]) == (0, 200)
    assert [m["content"] for m in request["messages"]] == [
        "Summarise the user's text in one sentence.",
        TEXT,
    ]
    # the node carries its tokens and their cost, as the ledger holds them
    (row,) = ledger("r1")
    assert (row["usage_id"], row["node_id"], row["kind"]) == ("r1/n1/model", "n1", "model")
    assert reported(outcome) == usage_of(row)
    prompt = prompt_tokens(request)
    answer = json.dumps(from_value(outcome.output))
    assert row["input_tokens"] == prompt and row["output_tokens"] == count_tokens(answer)
    assert row["cost_nano_usd"] == prompt * INPUT_NANO + row["output_tokens"] * OUTPUT_NANO > 0
    assert outcome.cost_nano_usd == 0  # the tool itself declares no cost


async def test_a_model_tool_is_a_tool_row_only_when_it_declares_a_cost_of_its_own(
    planner, model
) -> None:
    outbox = RecordingOutbox()
    priced = TOOLS.replace("    cache_ttl: 600\n", "    cache_ttl: 600\n    cost_nano_usd: 5\n", 1)
    invoker = Invoker(
        registry_of(planner, priced), None, trace.get_tracer(__name__), usage=ToolUsage(outbox)
    )
    await invoker.invoke(call("chat", "n1", question="hi"), run_id="r1")
    assert outbox.rows == []  # its model row is the record of the call
    outcome = await invoker.invoke(call("summarize", "n2", text=TEXT), run_id="r1")
    assert outcome.cost_nano_usd == 5
    assert [(r.node_id, r.tool_cost_nano_usd) for r in outbox.rows] == [("n2", 5)]


async def test_without_an_output_schema_the_output_is_the_text(invoker, model) -> None:
    script_of(model).reply("Paris.")
    outcome = await invoker.invoke(call("chat", "n1", question="Capital of France?"), run_id="r1")
    assert (outcome.status, from_value(outcome.output)) == (SUCCEEDED, "Paris.")
    assert "response_format" not in model.requests[0]
    assert outcome.usage.output_tokens == 2


async def test_a_deterministic_model_tool_is_cached_by_model_and_rendered_prompt(
    invoker, planner, cache, model, ledger
) -> None:
    first = await invoker.invoke(call("summarize", "n1", text=TEXT), run_id="r1")
    again = await invoker.invoke(call("summarize", "n2", text=TEXT), run_id="r1")
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert len(model.requests) == 1 and from_value(again.output) == from_value(first.output)
    assert reported(again) == (0, 0, 0) and [r["node_id"] for r in ledger("r1")] == ["n1"]
    # The same tool, version and arguments with another model: not the cached answer.
    other = TOOLS.replace("    cache_ttl: 600", "    cache_ttl: 600\n    model: gpt-4o-mini", 1)
    reloaded = Invoker(registry_of(planner, other), cache, trace.get_tracer(__name__))
    fresh = await reloaded.invoke(call("summarize", "n3", text=TEXT), run_id="r1")
    assert not fresh.cache_hit and len(model.requests) == 2
    assert model.requests[1]["model"] == "gpt-4o-mini"


def test_only_deterministic_model_tools_may_be_cached_and_placeholders_are_checked() -> None:
    cases = {
        TOOLS.replace("    temperature: 0\n", "", 1): "cache_ttl: only a deterministic",
        TOOLS.replace('content: "{text}"', 'content: "{txt}"', 1): "placeholders not in",
        TOOLS.replace(
            "  - name: embed\n    kind: embed\n",
            "  - name: embed\n    kind: embed\n    input_schema: {type: object}\n",
        ): "an embed tool's schemas are fixed",
        TOOLS + "  - {name: e, builtin: echo, batch: {max_items: 2}}\n": "batch: a builtin cannot",
    }
    for text, problem in cases.items():
        with pytest.raises(ToolsFileError, match=problem):
            registry_of(None, text)


async def test_a_failed_model_call_fails_the_node_and_reports_what_it_spent(
    invoker, model, ledger
) -> None:
    script_of(model).fail(500, times=3)  # the openai client's 2 retries included
    script_of(model).fail(500, times=3)  # ... and the tool's own retry
    outcome = await invoker.invoke(call("summarize", "n1", text=TEXT), run_id="r1")
    assert (outcome.status, outcome.error.code, outcome.attempts) == (
        FAILED,
        "MODEL_UNAVAILABLE",
        2,
    )
    assert reported(outcome) == (0, 0, 0)  # the model never answered
    # each attempt is a row of its own (zero tokens), so the ledger knows both calls ended
    assert [(r["usage_id"], usage_of(r)) for r in ledger("r1")] == [
        ("r1/n1/model", (0, 0, 0)),
        ("r1/n1/model/2", (0, 0, 0)),
    ]
    script_of(model).reply("this is not JSON")
    bad = await invoker.invoke(call("summarize", "n2", text="Another text."), run_id="r1")
    assert (bad.status, bad.error.code) == (FAILED, "MODEL_BAD_OUTPUT")
    assert bad.usage.output_tokens == count_tokens("this is not JSON")  # spent all the same
    script_of(model).reply('{"summary": 5, "words": 1}')
    wrong = await invoker.invoke(call("summarize", "n3", text="A third."), run_id="r1")
    assert (wrong.status, wrong.error.code) == (FAILED, "OUTPUT_CONTRACT")
    assert wrong.usage.input_tokens > 0
    rows = {r["node_id"]: usage_of(r) for r in ledger("r1") if r["node_id"] != "n1"}
    assert rows == {"n2": reported(bad), "n3": reported(wrong)}


async def test_over_budget_the_model_is_not_called(invoker, model, costs, channels, ledger) -> None:
    await CostsClient(channels.get(costs)).set_budget(
        costs_pb2.SetBudgetRequest(tenant_id="default", daily_limit_nano_usd=1)
    )
    outcome = await invoker.invoke(call("summarize", "n1", text=TEXT), run_id="r1")
    assert (outcome.status, outcome.error.code) == (FAILED, "BUDGET_EXCEEDED")
    assert list(model.requests) == [] and ledger("r1") == []


async def test_no_planner_is_a_clear_failure() -> None:
    invoker = Invoker(registry_of(None), None, trace.get_tracer(__name__))
    outcome = await invoker.invoke(call("chat", "n1", question="hi"))
    assert (outcome.status, outcome.error.code) == (FAILED, "MODEL_ACCESS_UNAVAILABLE")


async def test_ten_model_calls_at_once_stay_within_the_models_rate_limit(
    serve, channels, model, costs, monkeypatch: pytest.MonkeyPatch, ledger
) -> None:
    """Four requests a second (a burst of four, then one every 250 ms): ten concurrent
    calls all succeed, the model sees at most the limit, and the waits are counted."""

    def per_second(settings, telemetry=None) -> RateLimits:
        limit = Limit(requests=4, period=1.0)
        return RateLimits(InProcessRateLimiter(), default=limit, expected_output_tokens=0)

    monkeypatch.setattr(planner_service, "make_rate_limits", per_second)
    planner = await start_planner(serve, channels, model, costs)
    invoker = Invoker(registry_of(planner), None, trace.get_tracer(__name__))
    arrivals: list[float] = []
    model.state.next_behaviour = lambda body: arrivals.append(time.monotonic())  # type: ignore[func-returns-value]
    waited = (
        REGISTRY.get_sample_value(
            "trellis_model_rate_limited_total",
            {"model": "trellis-offline-rules-v1", "outcome": "waited"},
        )
        or 0.0
    )
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(invoker.invoke(call("chat", f"n{i}", question=f"q{i}"), run_id="r1") for i in range(10))
    )
    assert [o.status for o in outcomes] == [SUCCEEDED] * 10
    arrivals.sort()
    assert len(arrivals) == 10
    assert arrivals[3] - started < 0.5  # the burst went at once
    for index in range(4, 10):  # then one per 250 ms
        assert arrivals[index] - started >= (index - 3) * 0.25 - 0.05, (index, arrivals)
    after = REGISTRY.get_sample_value(
        "trellis_model_rate_limited_total",
        {"model": "trellis-offline-rules-v1", "outcome": "waited"},
    )
    assert after - waited == 6
    assert len(ledger("r1")) == 10


async def test_a_batch_is_one_model_request_and_its_tokens_are_split_exactly(
    invoker, model, ledger
) -> None:
    texts = [f"Document {i} is about {'cats ' * (i + 1)}. More follows." for i in range(5)]
    outcomes = await asyncio.gather(
        *(
            invoker.invoke(call("summarize_many", f"n{i}", text=t), run_id="r1")
            for i, t in enumerate(texts)
        )
    )
    assert [o.status for o in outcomes] == [SUCCEEDED] * 5
    (request,) = model.requests
    user = request["messages"][-1]["content"]
    assert [f"## Item {i}" in user for i in range(1, 6)] == [True] * 5
    assert request["response_format"]["json_schema"]["schema"]["required"] == ["results"]
    for text, outcome in zip(texts, outcomes, strict=True):  # as if asked alone
        assert from_value(outcome.output)["summary"] == text.split(".")[0] + "."
    rows = ledger("r1")
    assert [r["usage_id"] for r in rows] == [f"r1/n{i}/model" for i in range(5)]
    assert [usage_of(r) for r in rows] == [reported(o) for o in outcomes]
    prompt = prompt_tokens(request)
    answer = json.dumps({"results": [from_value(o.output) for o in outcomes]})
    assert sum(r["input_tokens"] for r in rows) == prompt
    assert sum(r["output_tokens"] for r in rows) == count_tokens(answer)
    # each node's share, priced by the ledger, sums to what the one request cost
    total = prompt * INPUT_NANO + count_tokens(answer) * OUTPUT_NANO
    assert sum(r["cost_nano_usd"] for r in rows) == total
    # longer prompts carry larger shares
    assert rows[4]["input_tokens"] > rows[0]["input_tokens"]


async def test_items_a_batch_answer_lacks_or_gets_wrong_are_asked_again_alone(
    invoker, model, ledger
) -> None:
    good = {"summary": "One.", "words": 1}
    script_of(model).reply(json.dumps({"results": [good, {"summary": "no words"}]}))
    outcomes = await asyncio.gather(
        *(
            invoker.invoke(call("summarize_many", f"n{i}", text=f"Text {i}."), run_id="r1")
            for i in range(3)
        )
    )
    assert [o.status for o in outcomes] == [SUCCEEDED] * 3
    assert from_value(outcomes[0].output) == good
    assert [from_value(o.output)["summary"] for o in outcomes[1:]] == ["Text 1.", "Text 2."]
    assert len(model.requests) == 3  # the batch, then item 2 and item 3 on their own
    rows = {r["usage_id"]: usage_of(r) for r in ledger("r1")}
    assert set(rows) == {
        "r1/n0/model",
        "r1/n1/model",
        "r1/n2/model",
        "r1/n1/model/single",
        "r1/n2/model/single",
    }
    for i in (1, 2):  # an item asked again reports its share plus its own call
        share, single = rows[f"r1/n{i}/model"], rows[f"r1/n{i}/model/single"]
        assert reported(outcomes[i]) == tuple(a + b for a, b in zip(share, single, strict=True))
    assert reported(outcomes[0]) == rows["r1/n0/model"]


async def test_embeddings_of_many_nodes_are_one_request(invoker, model, ledger) -> None:
    inputs = [["a cat sat", "a dog ran"], "a cat sat", ["stock prices"]]
    outcomes = await asyncio.gather(
        *(
            invoker.invoke(call("embed", f"n{i}", input=value), run_id="r1")
            for i, value in enumerate(inputs)
        )
    )
    assert [o.status for o in outcomes] == [SUCCEEDED] * 3
    (request,) = model.requests
    assert request["input"] == ["a cat sat", "a dog ran", "a cat sat", "stock prices"]
    vectors = [from_value(o.output)["vectors"] for o in outcomes]
    assert [len(v) for v in vectors] == [2, 1, 1]
    assert vectors[0][0] == vectors[1][0] != vectors[0][1]  # the same text, the same vector
    assert {len(v) for group in vectors for v in group} == {64}
    assert from_value(outcomes[0].output)["model"] == "trellis-offline-embed-v1"
    rows = ledger("r1")
    tokens = sum(count_tokens(t) for t in request["input"])
    assert sum(r["input_tokens"] for r in rows) == tokens
    assert sum(r["cost_nano_usd"] for r in rows) == tokens * EMBED_NANO
    assert [usage_of(r) for r in rows] == [reported(o) for o in outcomes]
