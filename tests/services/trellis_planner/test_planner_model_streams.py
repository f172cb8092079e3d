"""Model streams that go wrong, through the real openai client against the offline model:
an event that is not JSON or not a chunk ends the call MODEL_BAD_RESPONSE (not INTERNAL)
with its usage recorded as estimated, and a plan line over the limit ends the plan
INVALID_PLAN, read no further."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.support.model_script import script_of
from trellis.planner.v1 import planner_pb2
from trellis.runtime.errors import InvalidArgument, Unavailable
from trellis_planner.core import CallStarted, CallUsage, PlanEnd, Planner, PlanStarted
from trellis_planner.model import ChatModel
from trellis_planner.service import make_client
from trellis_planner.settings import PlannerSettings

MODEL = "trellis-offline-rules-v1"
NODE = '{{"node_id": "{id}", "tool": "echo", "args": {{"value": {value}}}, "depends_on": []}}\n'


def node_line(node_id: str, value: str = "1") -> str:
    return NODE.format(id=node_id, value=value)


def plan_request(tools, goal: str = "anything") -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(run_id="run-1", goal=goal, tools=tools)


async def drain(stream) -> list:
    seen = []
    async for item in stream:
        seen.append(item)
    return seen


def content(items: list) -> list:
    """Nodes and answer text, without the calls' usage reports."""
    return [i for i in items if not isinstance(i, CallStarted | CallUsage | PlanStarted)]


# --- a broken stream ----------------------------------------------------------------------


async def test_an_event_that_is_not_json_mid_plan_is_model_bad_response(
    planner, tools, model, recorder, spans
):
    two = node_line("n1") + node_line("n2")
    script_of(model).break_stream(two, after_pieces=30)  # past n1's line, inside n2's
    seen: list = []
    with pytest.raises(Unavailable) as raised:
        async for item in planner.plan(plan_request(tools)):
            seen.append(item)
    assert raised.value.reason == "MODEL_BAD_RESPONSE"
    assert raised.value.metadata == {"model": MODEL}
    assert "malformed stream: an event is not JSON" in raised.value.message
    assert [n.node_id for n in content(seen)] == ["n1"]  # the node before the break went out
    [recorded] = recorder.requests  # the call still counts: estimated from the text so far
    assert recorded.usage_id == "run-1/plan/0" and recorded.estimated
    assert recorded.usage.output_tokens > 0 and recorded.usage.input_tokens > 0
    assert len(model.requests) == 1  # no repair round, no other attempt
    [span] = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "MODEL_BAD_RESPONSE"
    assert span.attributes["trellis.usage.estimated"] is True


async def test_a_broken_join_stream_is_model_bad_response_with_estimated_usage(
    planner, model, recorder
):
    script_of(model).break_stream("The answer is forty two.", after_pieces=3)
    request = planner_pb2.JoinRequest(run_id="run-1", goal="g", round=1)
    seen: list = []
    with pytest.raises(Unavailable) as raised:
        async for item in planner.join(request):
            seen.append(item)
    assert raised.value.reason == "MODEL_BAD_RESPONSE"
    assert "".join(content(seen)) == "The answer is"
    # the broken call's usage is reported in the stream before the error
    assert isinstance(seen[-1], CallUsage) and seen[-1].usage.estimated
    [recorded] = recorder.requests
    assert recorded.usage_id == "run-1/join/1" and recorded.estimated


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        ("42", "an event is int, not a chunk object"),
        ("null", "an event is NoneType, not a chunk object"),
        ('{"choices": 5}', "choices is int, not list"),
        ('{"choices": [7]}', "choices[0] is int, not an object"),
        ('{"choices": [{"delta": "x"}]}', "choices[0].delta is str, not an object"),
        ('{"choices": [{"delta": {"content": 5}}]}', "choices[0].delta.content is int"),
        ('{"choices": [{"delta": {}, "finish_reason": 1}]}', "choices[0].finish_reason is int"),
        ('{"choices": [], "usage": "lots"}', "usage is str, not an object"),
        ('{"choices": [], "usage": {"prompt_tokens": "7"}}', "usage.prompt_tokens is str"),
        ('{"choices": [], "usage": {"completion_tokens": -3}}', "completion_tokens is negative"),
        ('{"choices": [], "model": ["m"]}', "model is list, not str"),
    ],
)
async def test_json_that_is_not_a_chunk_is_model_bad_response(
    chat_model, model, event: str, problem: str
):
    script_of(model).break_stream("some text here", after_pieces=2, event=event)
    call = chat_model.chat([{"role": "user", "content": "hi"}], model=MODEL)
    with pytest.raises(Unavailable) as raised:
        async with call:
            async for _ in call.deltas():
                pass
    assert raised.value.reason == "MODEL_BAD_RESPONSE"
    assert problem in raised.value.message
    assert call.opened and call.result.estimated and call.result.text == "some text"


async def test_a_chunk_with_only_unusual_fields_still_works(chat_model, model):
    # Fields the planner does not read are not checked: a provider's own finish reason
    # and a chunk without id/created are fine.
    event = '{"choices": [{"delta": {"content": "!"}, "finish_reason": "eos"}]}'
    script_of(model).break_stream("ok", after_pieces=5, event=event)  # after all of "ok"
    call = chat_model.chat([{"role": "user", "content": "hi"}], model=MODEL)
    async with call:
        text = "".join([parts.text async for parts in call.deltas()])
    assert text == "ok!" and call.result.finish_reasons == ["eos"]
    assert call.result.estimated  # the stream ended without its usage chunk


async def test_no_fallback_model_once_the_stream_broke(model, spans):
    settings = PlannerSettings(openai_base_url=model.base_url, model_max_retries=0)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    chat = ChatModel(
        make_client(settings), provider.get_tracer("t"), timeout=10, fallback_models=["backup"]
    )
    try:
        script_of(model).break_stream("partial answer", after_pieces=1)
        call = chat.chat([{"role": "user", "content": "hi"}], model="primary")
        with pytest.raises(Unavailable) as raised:
            async with call:
                async for _ in call.deltas():
                    pass
        assert raised.value.reason == "MODEL_BAD_RESPONSE"
        assert [body["model"] for body in model.requests] == ["primary"]
    finally:
        await chat.aclose()


# --- a plan line over the limit -----------------------------------------------------------


@pytest.fixture
async def limited(chat_model, recorder, make_outbox) -> Planner:
    outbox = await make_outbox(recorder.record_usage)
    return Planner(chat_model, outbox, default_model=MODEL, max_nodes=50, max_line_bytes=65536)


async def test_a_600_kb_plan_line_is_refused_at_the_limit(limited, tools, model, recorder):
    words = '"' + ("x" * 499 + " ") * 1200 + '"'  # 600 KB in 1200 stream pieces
    script_of(model).reply(node_line("n1") + node_line("n2", words) + node_line("n3"))
    seen: list = []
    with pytest.raises(InvalidArgument) as raised:
        async for item in limited.plan(plan_request(tools)):
            seen.append(item)
    assert raised.value.reason == "INVALID_PLAN"
    assert [(v.field, v.description) for v in raised.value.violations] == [
        ("plan", "line 2 is longer than 65536 bytes")
    ]
    assert 'it starts \'{"node_id": "n2"' in raised.value.message
    assert [n.node_id for n in content(seen)] == ["n1"]
    assert len(model.requests) == 1  # not repaired: quoting the line back would be as large
    [recorded] = recorder.requests
    assert recorded.estimated and recorded.usage_id == "run-1/plan/0"
    # The stream was read no further than the limit (plus what was in flight), not to
    # the end of the 600 KB line: output is estimated at 4 characters per token.
    assert 65536 // 4 <= recorded.usage.output_tokens < 200_000 // 4


async def test_lines_within_the_limit_plan_as_usual(limited, tools, model):
    value = '"' + "x" * 60_000 + '"'
    script_of(model).reply(node_line("n1", value) + node_line("n2"))
    items = await drain(limited.plan(plan_request(tools)))
    assert [n.node_id for n in content(items)[:-1]] == ["n1", "n2"]
    assert isinstance(items[-1], PlanEnd)


def test_the_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PlannerSettings().max_plan_line_bytes == 65536
    monkeypatch.setenv("TRELLIS_MAX_PLAN_LINE_BYTES", "1024")
    assert PlannerSettings().max_plan_line_bytes == 1024
    monkeypatch.setenv("TRELLIS_MAX_PLAN_LINE_BYTES", "0")
    with pytest.raises(ValueError, match="max_plan_line_bytes"):
        PlannerSettings()
