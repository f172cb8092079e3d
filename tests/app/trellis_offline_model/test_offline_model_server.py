"""The offline model over HTTP, through the real openai client (no mocks)."""

import time

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from tests.support.model_script import script_of
from trellis_offline_model.rules import MODEL_ID
from trellis_offline_model.server import RunningModel, start_offline_model
from trellis_offline_model.tokens import count_tokens

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
]
PROMPT_TOKENS = count_tokens("Be brief.") + count_tokens("hello there")


async def test_models_endpoint_names_the_rule_model(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    card = models.data[0].model_dump()
    assert "rule-based" in card["description"] and "not an LLM" in card["description"]
    assert (await client.models.retrieve(MODEL_ID)).id == MODEL_ID


async def test_non_streamed_completion_with_usage(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    text = completion.choices[0].message.content or ""
    assert completion.object == "chat.completion"
    assert completion.model == MODEL_ID
    assert completion.choices[0].finish_reason == "stop"
    assert "rule-based" in text
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.completion_tokens == count_tokens(text)
    assert completion.usage.total_tokens == PROMPT_TOKENS + count_tokens(text)


async def test_streamed_completion_in_pieces_with_a_final_usage_chunk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="any-name", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL_ID for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        PROMPT_TOKENS,
        count_tokens(text),
    )
    assert all(c.usage is None for c in chunks[:-1])
    whole = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    assert text == whole.choices[0].message.content


async def test_stream_without_include_usage_has_no_usage_chunk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


async def test_scripted_text_then_back_to_the_rules(model: RunningModel, client) -> None:
    script_of(model).reply("scripted answer")
    first = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    second = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    assert first.choices[0].message.content == "scripted answer"
    assert "rule-based" in (second.choices[0].message.content or "")
    assert len(model.requests) == 2 and model.requests[0]["messages"] == MESSAGES


async def test_scripted_errors_are_openai_errors(model: RunningModel, client) -> None:
    script_of(model).fail(429, message="slow down")
    with pytest.raises(openai.RateLimitError, match="slow down"):
        await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    script_of(model).fail(500)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, stream=True)


async def test_client_retries_consume_scripted_failures(model: RunningModel) -> None:
    retrying = AsyncOpenAI(base_url=model.base_url, api_key="unused", max_retries=2)
    try:
        script_of(model).fail(503, times=2, retry_after_ms=1)
        completion = await retrying.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
        assert completion.choices[0].message.content
        assert len(script_of(model)) == 0 and len(model.requests) == 3
    finally:
        await retrying.close()


async def test_stall_makes_the_client_time_out(model: RunningModel, client) -> None:
    script_of(model).stall(2.0)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, timeout=0.2)


async def test_bad_requests_get_openai_shaped_400s(model: RunningModel) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"{model.base_url}/chat/completions"
        async with session.post(url, data=b"{not json") as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
        async with session.post(url, json={"model": MODEL_ID, "messages": []}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "messages"


async def test_delay_paces_the_stream() -> None:
    slow = await start_offline_model(delay_ms=20)
    client = AsyncOpenAI(base_url=slow.base_url, api_key="unused", max_retries=0)
    try:
        script_of(slow).reply("one two three four five")
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, stream=True
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert "".join(p or "" for p in pieces) == "one two three four five"
        assert time.monotonic() - started >= 5 * 0.02
    finally:
        await client.close()
        await slow.stop()


async def test_base_url_uses_loopback_for_a_wildcard_host() -> None:
    running = await start_offline_model(host="0.0.0.0", port=0)
    try:
        assert running.base_url == f"http://127.0.0.1:{running.port}/v1"
    finally:
        await running.stop()
