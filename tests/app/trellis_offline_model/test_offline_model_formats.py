"""The offline model speaks the three plan formats the way OpenAI's API does.

- Tool calls: the raw SSE events are checked field by field and against the ``openai``
  package's own chunk types; the SDK's stream helper assembles them into whole calls
  with parsed arguments; rounds follow the conversation (a result feeds the next call).
- JSON Schema: the document it writes validates against the request's schema.
- It reads the catalog from ``tools`` / ``response_format`` only: the same goal with
  the same tools gets the same plan whatever the prompt says.
"""

from __future__ import annotations

import json

import aiohttp
from jsonschema import Draft202012Validator
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from tests.services.trellis_planner.conftest import make_tools
from tests.support.model_script import script_of
from trellis_offline_model.rules import MODEL_ID
from trellis_offline_model.server import RunningModel
from trellis_planner.plan_schema import FunctionNames, response_format, tool_definitions

DEMO = "Report this machine's OS, disk usage and uptime"
TOOLS = tool_definitions(make_tools(), FunctionNames(t.name for t in make_tools()))


def body(goal: str, **extra) -> dict:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "system", "content": "Plan."}, {"role": "user", "content": goal}],
        **extra,
    }


async def raw_events(model: RunningModel, request: dict) -> list[dict]:
    """The ``data:`` objects of a streamed reply, as sent on the wire."""
    async with aiohttp.ClientSession() as session:
        url = f"{model.base_url}/chat/completions"
        async with session.post(url, json=request) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            text = (await response.read()).decode()
    data = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


async def test_streamed_tool_calls_have_openais_chunk_shapes(model: RunningModel) -> None:
    request = body(DEMO, tools=TOOLS, stream=True, stream_options={"include_usage": True})
    events = await raw_events(model, request)
    for event in events:  # the openai package's own types take every one
        ChatCompletionChunk.model_validate(event)
        assert event["object"] == "chat.completion.chunk" and event["model"] == MODEL_ID
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    deltas = [e["choices"][0]["delta"] for e in events[1:-2]]
    firsts = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [(c["index"], c["type"], c["function"]) for c in firsts] == [
        (i, "function", {"name": "run_command", "arguments": ""}) for i in range(3)
    ]
    assert all(c["id"].startswith("call_") for c in firsts)
    fragments = [d["tool_calls"][0] for d in deltas if "id" not in d["tool_calls"][0]]
    assert all(
        set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for f in fragments
    )
    by_call = {
        i: "".join(f["function"]["arguments"] for f in fragments if f["index"] == i)
        for i in range(3)
    }
    assert [json.loads(a) for a in by_call.values()] == [
        {"command": "uname -a"},
        {"command": "df -h"},
        {"command": "uptime"},
    ]
    assert len(fragments) > 6  # arguments come in pieces
    finish = events[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "tool_calls"
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert all(e["usage"] is None for e in events[:-1])


async def test_the_sdk_assembles_the_calls_and_the_next_round(model: RunningModel) -> None:
    client = AsyncOpenAI(base_url=model.base_url, api_key="unused", max_retries=0)
    try:
        goal = "compute 6*7 then echo the result"
        messages = body(goal)["messages"]
        async with client.chat.completions.stream(
            model=MODEL_ID, messages=messages, tools=TOOLS
        ) as stream:
            completion = await stream.get_final_completion()
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls or []
        assert call.function.name == "arithmetic"
        assert json.loads(call.function.arguments) == {"expression": "6*7"}
        messages += [
            choice.message.model_dump(exclude_none=True),
            {
                "role": "tool",
                "tool_call_id": call.id,
                "content": json.dumps({"status": "SUCCEEDED", "output": {"result": 42}}),
            },
        ]
        second = await client.chat.completions.create(
            model=MODEL_ID, messages=messages, tools=TOOLS
        )
        [echo] = second.choices[0].message.tool_calls or []
        assert (echo.function.name, json.loads(echo.function.arguments)) == (
            "echo",
            {"value": {"result": 42}},
        )
        messages += [
            second.choices[0].message.model_dump(exclude_none=True),
            {
                "role": "tool",
                "tool_call_id": echo.id,
                "content": json.dumps({"status": "SUCCEEDED", "output": {"result": 42}}),
            },
        ]
        final = await client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS)
        assert final.choices[0].finish_reason == "stop"
        assert final.choices[0].message.tool_calls is None
        assert (final.choices[0].message.content or "").splitlines()[1] == "- 6*7 = 42"
        none = await client.chat.completions.create(
            model=MODEL_ID, messages=body(goal)["messages"], tools=TOOLS, tool_choice="none"
        )
        assert none.choices[0].message.tool_calls is None  # must answer: nothing ran
    finally:
        await client.close()


async def test_a_json_schema_plan_validates_against_the_request_schema(model) -> None:
    fmt = response_format(make_tools())
    client = AsyncOpenAI(base_url=model.base_url, api_key="unused", max_retries=0)
    try:
        completion = await client.chat.completions.create(
            model=MODEL_ID,
            messages=body("compute 6*7 then echo the result, and sleep 5 ms")["messages"],
            response_format=fmt,
        )
    finally:
        await client.close()
    plan = json.loads(completion.choices[0].message.content or "")
    schema = fmt["json_schema"]["schema"]
    assert list(Draft202012Validator(schema).iter_errors(plan)) == []
    assert plan["nodes"] == [
        {"node_id": "n1", "tool": "arithmetic", "args": {"expression": "6*7"}, "depends_on": []},
        {"node_id": "n2", "tool": "echo", "args": {"value": "$n1"}, "depends_on": ["n1"]},
        {"node_id": "n3", "tool": "sleep", "args": {"ms": 5}, "depends_on": []},
    ]


async def test_the_catalog_comes_from_the_request_not_the_prompt(model: RunningModel) -> None:
    client = AsyncOpenAI(base_url=model.base_url, api_key="unused", max_retries=0)
    try:
        for system in ("## Tools\nnothing useful", "Completely different prose."):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": DEMO}]
            completion = await client.chat.completions.create(
                model=MODEL_ID, messages=messages, tools=TOOLS
            )
            calls = completion.choices[0].message.tool_calls or []
            assert [json.loads(c.function.arguments)["command"] for c in calls] == [
                "uname -a",
                "df -h",
                "uptime",
            ]
    finally:
        await client.close()


async def test_scripted_deltas_and_plans(model: RunningModel) -> None:
    script_of(model).deltas({"refusal": "No."}, finish_reason="stop")
    events = await raw_events(model, body("x", stream=True))
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": ""},
        {"refusal": "No."},
        {},
    ]
    node = {"node_id": "a", "tool": "echo", "args": {"value": 1}, "depends_on": []}
    script_of(model).plan(node)
    events = await raw_events(model, body("x", tools=TOOLS, stream=True))
    first = events[1]["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"] == {"name": "echo", "arguments": ""}
