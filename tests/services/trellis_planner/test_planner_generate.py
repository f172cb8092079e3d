"""Generate and Embed: the planner's model calls made for model tools.

The core (``Generator``) against the offline model with a recording cost accounting: the
request it sends (strict structured output, temperature, max tokens), its GenAI span, one
ledger row per share with the call's tokens split exactly, the in-band error of a call
that failed once made (its usage still recorded), a call cut by its own ``timeout``, and
the budget check. Over real gRPC: the caller's mistakes are INVALID_ARGUMENT naming each
field, and an Embed whose endpoint answers the wrong number of vectors is
MODEL_BAD_RESPONSE in the response."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from openai import AsyncOpenAI
from opentelemetry.sdk.trace import TracerProvider

from tests.support.dead_target import dead_target
from tests.support.model_script import script_of
from trellis.clients.budget_check import BudgetPolicy
from trellis.clients.planner import PlannerClient
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import duration, to_struct
from trellis.runtime.errors import InvalidArgument, ResourceExhausted
from trellis_offline_model.tokens import count_tokens
from trellis_planner.generate import Generator, split_usage
from trellis_planner.model import ChatModel
from trellis_planner.service import NAME, build
from trellis_planner.settings import PlannerSettings

SCHEMA = {
    "type": "object",
    "properties": {"summary": {"type": "string"}, "words": {"type": "integer"}},
    "required": ["summary", "words"],
    "additionalProperties": False,
}


def share(node: str, weight: int = 1, run: str = "r1", suffix: str = "") -> planner_pb2.UsageShare:
    usage_id = f"{run}/{node}/model{suffix}" if run else ""
    return planner_pb2.UsageShare(run_id=run, node_id=node, usage_id=usage_id, weight=weight)


def request(text: str = "Cats sleep a lot. Dogs do not.", **fields) -> planner_pb2.GenerateRequest:
    fields.setdefault("shares", [share("n1")])
    return planner_pb2.GenerateRequest(
        messages=[
            planner_pb2.ChatMessage(role="system", content="Summarise."),
            planner_pb2.ChatMessage(role="user", content=text),
        ],
        **fields,
    )


@pytest.fixture
async def generator(chat_model: ChatModel, recorder, make_outbox) -> Generator:
    outbox = await make_outbox(recorder.record_usage)
    return Generator(
        chat_model,
        outbox,
        default_model="trellis-offline-rules-v1",
        embedding_model="trellis-offline-embed-v1",
    )


async def test_structured_output_is_asked_for_strictly_and_recorded_for_the_node(
    generator, model, recorder, spans
) -> None:
    structured = request(
        output_schema=to_struct(SCHEMA),
        output_name="summarize",
        temperature=0,
        max_output_tokens=50,
        tool="summarize",
    )
    generated = await generator.generate(structured)
    assert generated.error is None
    assert json.loads(generated.text) == {"summary": "Cats sleep a lot.", "words": 7}
    (sent,) = model.requests
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "summarize", "schema": SCHEMA, "strict": True},
    }
    assert (sent["temperature"], sent["max_completion_tokens"]) == (0, 50)
    (row,) = recorder.requests
    assert (row.usage_id, row.run_id, row.node_id, row.kind) == (
        "r1/n1/model",
        "r1",
        "n1",
        costs_pb2.USAGE_KIND_MODEL,
    )
    # what the endpoint reported: the messages and the response schema it was sent
    [sent] = model.requests
    asked = count_tokens("Summarise.") + count_tokens("Cats sleep a lot. Dogs do not.")
    schema = count_tokens(json.dumps(sent["response_format"]))
    assert row.usage.input_tokens == asked + schema
    assert row.usage.output_tokens == count_tokens(generated.text)
    (usage,) = generated.usage
    assert (usage.usage_id, usage.usage.cost_nano_usd, usage.deferred) == (
        "r1/n1/model",
        1234,
        False,
    )
    (span,) = [s for s in spans.get_finished_spans() if s.name == "chat trellis-offline-rules-v1"]
    attributes = dict(span.attributes)
    assert attributes["trellis.planner.step"] == "generate"
    assert attributes["trellis.tool"] == "summarize"
    assert attributes["trellis.node_id"] == "n1"
    assert attributes["gen_ai.output.type"] == "json"
    assert attributes["gen_ai.request.temperature"] == 0
    assert attributes["gen_ai.usage.output_tokens"] == row.usage.output_tokens


async def test_one_call_for_many_nodes_is_one_row_each_summing_to_the_call(
    generator, model, recorder
) -> None:
    shares = [share("a", 1), share("b", 3), share("c", 6), share("d", 0, run="")]
    generated = await generator.generate(request(shares=shares))
    assert len(model.requests) == 1 and generated.error is None
    rows = recorder.requests
    assert [r.node_id for r in rows] == ["a", "b", "c", "d"]
    assert [r.usage_id for r in rows[:3]] == ["r1/a/model", "r1/b/model", "r1/c/model"]
    assert rows[3].usage_id and rows[3].run_id == ""  # outside a run: a fresh id
    total_in = count_tokens("Summarise.") + count_tokens("Cats sleep a lot. Dogs do not.")
    assert sum(r.usage.input_tokens for r in rows) == total_in
    assert sum(r.usage.output_tokens for r in rows) == count_tokens(generated.text)
    inputs = [r.usage.input_tokens for r in rows]
    assert inputs[2] >= inputs[1] >= inputs[0] and inputs[2] > inputs[0]


def test_usage_splits_exactly_and_never_gives_a_share_more_cached_than_input() -> None:
    usage = common_pb2.Usage(
        model="m", input_tokens=101, cached_input_tokens=97, output_tokens=13, estimated=True
    )
    for weights in ([1], [1, 1, 1], [5, 1, 1, 9], [0, 0, 7], list(range(1, 30))):
        parts = split_usage(usage, weights)
        assert sum(p.input_tokens for p in parts) == 101
        assert sum(p.cached_input_tokens for p in parts) == 97
        assert sum(p.output_tokens for p in parts) == 13
        assert all(p.cached_input_tokens <= p.input_tokens for p in parts)
        assert all(p.estimated and p.model == "m" for p in parts)


async def test_a_call_that_failed_once_made_answers_its_error_and_records_every_share(
    generator, model, recorder
) -> None:
    script_of(model).fail(500, times=3)
    generated = await generator.generate(request(shares=[share("a"), share("b")]))
    assert generated.error is not None
    assert (generated.error.code, generated.error.retryable) == ("MODEL_UNAVAILABLE", True)
    assert generated.text == ""
    assert [(r.usage_id, r.usage.input_tokens) for r in recorder.requests] == [
        ("r1/a/model", 0),
        ("r1/b/model", 0),
    ]


async def test_the_requests_timeout_bounds_the_model_call_and_the_answer_comes_back(
    generator, model, recorder
) -> None:
    script_of(model).stall(5)
    generated = await asyncio.wait_for(
        generator.generate(request(timeout=duration(0.3))), timeout=3
    )
    assert generated.error is not None and generated.error.code == "DEADLINE_EXCEEDED"
    (row,) = recorder.requests  # sent and cut: its prompt was read, estimated
    assert row.usage_id == "r1/n1/model" and row.estimated
    assert row.usage.input_tokens > 0 and row.usage.output_tokens == 0


async def test_over_budget_nothing_is_called_or_recorded(model, recorder, make_outbox) -> None:
    class NoBudget:
        async def check_budget(self, *args, **kwargs) -> costs_pb2.CheckBudgetResponse:
            return costs_pb2.CheckBudgetResponse(allowed=False, daily_limit_nano_usd=1)

    client = AsyncOpenAI(base_url=model.base_url, api_key="unused")
    chat = ChatModel(
        client,
        TracerProvider().get_tracer("t"),
        timeout=5,
        budget=NoBudget(),
        budget_policy=BudgetPolicy(),
    )
    generator = Generator(
        chat, await make_outbox(recorder.record_usage), default_model="m", embedding_model="e"
    )
    with pytest.raises(ResourceExhausted) as refused:
        await generator.generate(request())
    assert refused.value.reason == "BUDGET_EXCEEDED"
    with pytest.raises(ResourceExhausted):
        await generator.embed(planner_pb2.EmbedRequest(inputs=["x"], shares=[share("n1")]))
    assert list(model.requests) == [] and recorder.requests == []
    await chat.aclose()


async def test_embed_gives_one_vector_per_input_and_records_its_tokens(
    generator, model, recorder, spans
) -> None:
    embedded = await generator.embed(
        planner_pb2.EmbedRequest(
            inputs=["a cat", "a dog", "a cat"],
            shares=[share("n1", 2), share("n2", 1)],
            dimensions=8,
        )
    )
    assert embedded.error is None
    assert [len(v) for v in embedded.vectors] == [8, 8, 8]
    assert embedded.vectors[0] == embedded.vectors[2] != embedded.vectors[1]
    assert model.requests[0]["model"] == "trellis-offline-embed-v1"
    rows = recorder.requests
    assert sum(r.usage.input_tokens for r in rows) == 3 * count_tokens("a cat")
    assert [r.usage.model for r in rows] == ["trellis-offline-embed-v1"] * 2
    (span,) = [s for s in spans.get_finished_spans() if s.name.startswith("embeddings ")]
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.usage.input_tokens"] == 6


# -- over gRPC ---------------------------------------------------------------------------


@pytest.fixture
async def client(serve, channels, model, tmp_path) -> PlannerClient:
    settings = PlannerSettings(
        port=0,
        metrics_port=0,
        openai_base_url=model.base_url,
        costs_target=dead_target(),  # fail open: calls are made, usage waits in the outbox
        outbox_path=tmp_path / "outbox.db",
    )
    server = await serve(NAME, build, settings)
    return PlannerClient(channels.get(server.target), timeout=30)


async def test_a_callers_mistakes_are_invalid_argument_naming_each_field(client) -> None:
    bad = planner_pb2.GenerateRequest(
        messages=[planner_pb2.ChatMessage(role="robot", content="hi")],
        shares=[
            planner_pb2.UsageShare(run_id="r1", node_id="n1", usage_id="r1/n2/model"),
            planner_pb2.UsageShare(run_id="r 1", node_id="n1"),
        ],
        output_schema=to_struct({"type": "nonsense"}),
        output_name="ok",
        temperature=3,
    )
    with pytest.raises(InvalidArgument) as raised:
        await client.generate(bad)
    fields = {v.field for v in raised.value.violations}
    assert {
        "messages[0].role",
        "shares[0].usage_id",
        "shares[1].run_id",
        "output_schema",
        "temperature",
    } <= fields
    with pytest.raises(InvalidArgument) as raised:
        await client.generate(planner_pb2.GenerateRequest(messages=bad.messages[:0]))
    assert {v.field for v in raised.value.violations} == {"shares", "messages"}
    assert raised.value.reason == "INVALID_MODEL_REQUEST"
    with pytest.raises(InvalidArgument):
        await client.embed(planner_pb2.EmbedRequest(inputs=[], shares=[share("n1")]))


async def test_an_embed_answer_without_a_vector_per_input_is_a_bad_response(
    serve, channels, http_app, tmp_path
) -> None:
    async def embeddings(request: web.Request) -> web.Response:
        item = {"object": "embedding", "index": 0, "embedding": [0.5, 0.5]}
        usage = {"prompt_tokens": 4, "total_tokens": 4}
        return web.json_response({"object": "list", "data": [item], "model": "e", "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    port = await http_app(app)
    settings = PlannerSettings(
        port=0,
        metrics_port=0,
        openai_base_url=f"http://127.0.0.1:{port}/v1",
        costs_target=dead_target(),
        outbox_path=tmp_path / "outbox.db",
    )
    server = await serve(NAME, build, settings)
    planner = PlannerClient(channels.get(server.target), timeout=30)
    response = await planner.embed(
        planner_pb2.EmbedRequest(inputs=["one", "two"], shares=[share("n1")])
    )
    assert response.error.code == "MODEL_BAD_RESPONSE"
    assert list(response.embeddings) == []
    (usage,) = response.usage
    assert (usage.usage_id, usage.usage.input_tokens, usage.cost_deferred) == (
        "r1/n1/model",
        4,
        True,
    )


async def test_an_answer_that_is_not_a_completion_is_a_bad_response(
    recorder, make_outbox, http_app
) -> None:
    async def completions(request: web.Request) -> web.Response:
        usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        answer = {"id": "x", "object": "chat.completion", "model": "m", "choices": 5}
        return web.json_response({**answer, "created": 0, "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    port = await http_app(app)
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    chat = ChatModel(client, TracerProvider().get_tracer("t"), timeout=5)
    generator = Generator(
        chat, await make_outbox(recorder.record_usage), default_model="m", embedding_model="e"
    )
    generated = await generator.generate(request())
    assert generated.error is not None and generated.error.code == "MODEL_BAD_RESPONSE"
    (row,) = recorder.requests  # it answered unreadably: its tokens are estimated
    assert row.estimated and row.usage.input_tokens > 0
    await chat.aclose()
