"""The offline model's answers to model tools (strict structured output, batches) and its
embeddings endpoint, through the real openai client."""

from __future__ import annotations

import json

import openai
import pytest
from openai import AsyncOpenAI

from tests.support.model_script import script_of
from trellis_offline_model.generating import (
    EMBEDDING_MODEL_ID,
    PLAN_SCHEMA_NAME,
    batch_items,
    fill,
    structured_schema,
    vectors,
)
from trellis_offline_model.rules import FALLBACK
from trellis_offline_model.tokens import count_tokens

SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "words": {"type": "integer"},
        "chars": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "mood": {"type": "string", "enum": ["calm", "angry"]},
        "urgent": {"type": "boolean"},
        "note": {"type": ["string", "null"]},
    },
    "required": ["summary", "words", "chars", "tags", "mood", "urgent", "note"],
    "additionalProperties": False,
}
TEXT = "The cat sat on the mat. It slept all day!"


def structured(schema: dict, name: str = "summarize") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_a_value_matching_the_schema_is_made_from_the_text() -> None:
    assert fill(SCHEMA, TEXT) == {
        "summary": "The cat sat on the mat.",
        "words": 10,
        "chars": len(TEXT),
        "tags": ["The cat sat on the mat.", "It slept all day!"],
        "mood": "calm",
        "urgent": False,
        "note": "The cat sat on the mat It slept all day",
    }
    assert fill({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "a b") == [2, 2]
    assert fill({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "a b c") == 3


def test_plans_and_joins_are_not_model_tool_requests() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": structured({})}
    assert structured_schema(body) == {}
    plan = structured({"type": "object"}, name=PLAN_SCHEMA_NAME)
    assert structured_schema({**body, "response_format": plan}) is None
    assert structured_schema({**body, "tools": [{"type": "function"}]}) is None
    assert structured_schema({"messages": body["messages"]}) is None


def test_batch_items_are_the_user_text_of_each_item() -> None:
    text = "## Item 1\n### system\nBe brief.\n### user\nFirst text.\n\n## Item 2\n### user\nSecond."
    assert batch_items(text) == ["First text.", "Second."]
    assert batch_items("no items here") == []


def test_vectors_are_unit_length_deterministic_and_closer_for_shared_words() -> None:
    a, b, c, empty = vectors(["cats and dogs", "cats and mice", "stock market news", ""], 32)
    assert a == vectors(["cats and dogs"], 32)[0]
    assert abs(sum(v * v for v in a) - 1) < 1e-9 and empty == [0.0] * 32

    def cosine(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    assert cosine(a, b) > cosine(a, c)


async def test_structured_output_through_the_openai_client(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": TEXT}],
        response_format=structured(SCHEMA),  # type: ignore[arg-type]
    )
    answer = json.loads(completion.choices[0].message.content or "")
    assert answer["summary"] == "The cat sat on the mat." and answer["words"] == 10
    assert completion.usage is not None
    assert completion.usage.completion_tokens == count_tokens(completion.choices[0].message.content)


async def test_a_batch_gets_one_answer_per_item(client: AsyncOpenAI) -> None:
    batch = {
        "type": "object",
        "properties": {"results": {"type": "array", "items": SCHEMA}},
        "required": ["results"],
        "additionalProperties": False,
    }
    items = {1: "One two.", 2: "Three.", 3: "A b c d."}
    user = "\n".join(f"## Item {n}\n### user\n{text}\n" for n, text in items.items())
    stream = await client.chat.completions.create(
        model="any",
        messages=[{"role": "system", "content": "Answer each."}, {"role": "user", "content": user}],
        response_format=structured(batch),  # type: ignore[arg-type]
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    results = json.loads(text)["results"]
    assert [r["words"] for r in results] == [2, 1, 4]


async def test_a_free_text_request_still_gets_the_rules_notice(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hello"}]
    )
    assert completion.choices[0].message.content == FALLBACK


async def test_embeddings_through_the_openai_client(client: AsyncOpenAI, model) -> None:
    texts = ["a cat", "a dog", "a cat"]
    answer = await client.embeddings.create(model="whatever", input=texts, dimensions=16)
    assert answer.model == EMBEDDING_MODEL_ID
    assert [d.index for d in answer.data] == [0, 1, 2]
    assert [len(d.embedding) for d in answer.data] == [16, 16, 16]
    assert answer.data[0].embedding == pytest.approx(vectors(["a cat"], 16)[0], abs=1e-6)
    assert answer.data[0].embedding == answer.data[2].embedding
    assert answer.usage.prompt_tokens == sum(count_tokens(t) for t in texts)
    # the client's default encoding is base64: decoded to the same numbers
    default = await client.embeddings.create(model="whatever", input="a cat")
    assert default.data[0].embedding == pytest.approx(vectors(["a cat"])[0], abs=1e-6)
    assert model.requests[-1]["encoding_format"] == "base64"


async def test_embeddings_refuse_bad_input_and_follow_the_script(
    client: AsyncOpenAI, model
) -> None:
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="e", input=[])
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="e", input="x", dimensions=0)
    script_of(model).fail(429)
    with pytest.raises(openai.RateLimitError):
        await client.embeddings.create(model="e", input="x")


def test_the_plan_schema_name_is_the_planners() -> None:
    """The offline model stands apart from the services (it plays an external server), so it
    keeps its own copy of the name the planner gives its plan schema."""
    from trellis_planner.plan_schema import SCHEMA_NAME

    assert PLAN_SCHEMA_NAME == SCHEMA_NAME
