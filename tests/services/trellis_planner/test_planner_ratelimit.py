"""Per-model rate limits in one process: token buckets, waiting within the deadline,
RESOURCE_EXHAUSTED with RetryInfo beyond it (also across gRPC), and their settings."""

from __future__ import annotations

import time
import uuid

import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from trellis.clients.planner import PlannerClient
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.errors import ResourceExhausted, to_status
from trellis_planner.model import ChatModel, estimate_input_tokens
from trellis_planner.ratelimit import Decision, InProcessRateLimiter, Limit, RateLimits
from trellis_planner.service import NAME, build, make_client, make_rate_limits
from trellis_planner.settings import PlannerSettings

MESSAGES = [{"role": "user", "content": "What is (17*23)+4?"}]
DEMO = "Report this machine's OS, disk usage and uptime"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the buckets ------------------------------------------------------------------------


async def test_requests_bucket_bursts_then_reserves_then_refuses():
    clock = Clock()
    limiter = InProcessRateLimiter(clock)
    limit = Limit(requests=2)  # 2 per minute: burst of 2, one more every 30 s
    assert await limiter.reserve("m", 10, limit, max_wait=0) == Decision(True, 0.0)
    assert (await limiter.reserve("m", 10, limit, max_wait=0)).granted
    refused = await limiter.reserve("m", 10, limit, max_wait=5)
    assert not refused.granted and refused.wait == pytest.approx(30)
    reserved = await limiter.reserve("m", 10, limit, max_wait=30)  # may wait: takes its turn
    assert reserved.granted and reserved.wait == pytest.approx(30)
    queued = await limiter.reserve("m", 10, limit, max_wait=100)  # behind the one waiting
    assert queued.granted and queued.wait == pytest.approx(60)
    clock.now += 90  # both waits served, bucket back to empty
    assert (await limiter.reserve("m", 10, limit, max_wait=0)).wait == 0
    assert (await limiter.reserve("other", 10, limit, max_wait=0)).wait == 0  # per model


async def test_tokens_bucket_and_both_or_neither():
    clock = Clock()
    limiter = InProcessRateLimiter(clock)
    limit = Limit(requests=2, tokens=600)  # 10 tokens/s, a request every 30 s
    assert (await limiter.reserve("m", 500, limit, max_wait=0)).granted
    refused = await limiter.reserve("m", 200, limit, max_wait=1)
    assert not refused.granted and refused.wait == pytest.approx(10)
    # The refused call took no request either: one is left, with the last 100 tokens.
    assert await limiter.reserve("m", 100, limit, max_wait=0) == Decision(True, 0.0)
    refused = await limiter.reserve("m", 1, limit, max_wait=0)
    assert not refused.granted and refused.wait == pytest.approx(30)  # the longer wait
    clock.now += 60  # full again; a call bigger than the whole minute waits for a full bucket
    assert await limiter.reserve("m", 10_000, limit, max_wait=0) == Decision(True, 0.0)


async def test_admit_waits_or_raises_resource_exhausted_with_retry_info():
    model = f"m-{uuid.uuid4().hex[:8]}"
    limits = RateLimits(
        InProcessRateLimiter(), default=Limit(requests=1, period=0.5), expected_output_tokens=0
    )
    assert await limits.admit(model, 10, max_wait=0) == 0
    started = time.monotonic()
    waited = await limits.admit(model, 10, max_wait=2)
    assert 0.4 < waited <= 0.5 and time.monotonic() - started >= waited
    with pytest.raises(ResourceExhausted) as raised:
        await limits.admit(model, 10, max_wait=0.1)
    error = raised.value
    assert error.reason == "MODEL_RATE_LIMITED" and error.metadata["model"] == model
    assert 0.4 < error.retry_delay <= 0.5
    counted = {"model": model, "outcome": "rejected"}
    assert REGISTRY.get_sample_value("trellis_model_rate_limited_total", counted) == 1
    # On the wire: google.rpc.RetryInfo beside ErrorInfo.
    details = to_status(error).trailing_metadata[0][1]
    status = status_pb2.Status.FromString(details)
    [info] = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    retry = error_details_pb2.RetryInfo()
    info.Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() / 1e9 == pytest.approx(error.retry_delay)


def test_token_cost_is_estimated_input_plus_expected_output():
    limits = RateLimits(InProcessRateLimiter(), expected_output_tokens=256)
    assert limits.cost(estimate_input_tokens(MESSAGES)) == 5 + 256


async def test_unlimited_models_are_not_limited():
    limits = RateLimits(InProcessRateLimiter(), per_model={"x": Limit(requests=1)})
    for _ in range(100):
        assert await limits.admit("y", 10**9, max_wait=0) == 0


# --- on model calls ---------------------------------------------------------------------


@pytest.fixture
async def limited(model):
    """A ChatModel allowing one request per 1 s per model, and its spans."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    limits = RateLimits(InProcessRateLimiter(), default=Limit(requests=1, period=1.0))
    settings = PlannerSettings(openai_base_url=model.base_url)
    chat = ChatModel(
        make_client(settings), provider.get_tracer("t"), timeout=10, rate_limits=limits
    )
    yield chat, spans
    await chat.aclose()


async def complete(chat: ChatModel, name: str) -> str:
    call = chat.chat(MESSAGES, model=name)
    async with call:
        return "".join([parts.text async for parts in call.deltas()])


async def test_second_call_in_the_window_waits_within_the_deadline(limited, model):
    chat, spans = limited
    name = f"m-{uuid.uuid4().hex[:8]}"
    await complete(chat, name)
    started = time.monotonic()
    with context.request_scope(timeout=5):
        assert await complete(chat, name)
    assert 0.8 < time.monotonic() - started < 3
    assert len(model.requests) == 2
    first, second = spans.get_finished_spans()
    assert "trellis.rate_limit.wait_s" not in first.attributes
    assert 0.8 < second.attributes["trellis.rate_limit.wait_s"] <= 1.0


async def test_second_call_fails_fast_when_the_deadline_is_too_short(limited, model):
    chat, spans = limited
    name = f"m-{uuid.uuid4().hex[:8]}"
    await complete(chat, name)
    started = time.monotonic()
    with context.request_scope(timeout=0.3), pytest.raises(ResourceExhausted) as raised:
        await complete(chat, name)
    assert time.monotonic() - started < 0.2  # refused at once, not after the deadline
    assert raised.value.reason == "MODEL_RATE_LIMITED"
    assert 0.8 < raised.value.retry_delay <= 1.0
    assert len(model.requests) == 1  # the model never saw it
    assert spans.get_finished_spans()[-1].attributes["error.type"] == "MODEL_RATE_LIMITED"


async def test_a_rate_limited_primary_falls_back(model):
    primary, backup = (f"{p}-{uuid.uuid4().hex[:8]}" for p in ("primary", "backup"))
    limits = RateLimits(InProcessRateLimiter(), per_model={primary: Limit(requests=1)})
    settings = PlannerSettings(openai_base_url=model.base_url)
    chat = ChatModel(
        make_client(settings),
        TracerProvider().get_tracer("t"),
        timeout=10,
        rate_limits=limits,
        fallback_models=[backup],
    )
    try:
        await complete(chat, primary)
        with context.request_scope(timeout=5):
            await complete(chat, primary)  # the primary is full for 60 s: the backup answers
    finally:
        await chat.aclose()
    assert [body["model"] for body in model.requests] == [primary, backup]


async def test_rate_limited_over_grpc_carries_retry_info(serve, channels, model, tools):
    settings = PlannerSettings(
        port=0,
        metrics_port=0,
        openai_base_url=model.base_url,
        costs_target="127.0.0.1:9",  # nothing there: budget fails open, usage not recorded
        model_rpm=1,
    )
    server = await serve(NAME, build, settings)
    planner = PlannerClient(channels.get(server.target), timeout=2)
    request = planner_pb2.PlanRequest(goal=DEMO, tools=tools)
    _ = [event async for event in planner.plan(request)]
    with pytest.raises(ResourceExhausted) as raised:
        _ = [event async for event in planner.plan(request)]
    assert raised.value.reason == "MODEL_RATE_LIMITED"
    assert 50 < raised.value.retry_delay <= 60  # one request a minute, rebuilt by the client
    assert len(model.requests) == 1


# --- settings ---------------------------------------------------------------------------


def test_rate_limit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = PlannerSettings()
    assert (defaults.model_rpm, defaults.model_tpm, defaults.redis_url) == (0, 0, "")
    assert defaults.model_expected_output_tokens == 256
    monkeypatch.setenv("TRELLIS_MODEL_RPM", "60")
    monkeypatch.setenv("TRELLIS_MODEL_TPM", "10000")
    monkeypatch.setenv(
        "TRELLIS_MODEL_RATE_LIMITS", '{"big": {"rpm": 5}, "free": {"rpm": 0, "tpm": 0}}'
    )
    limits = make_rate_limits(PlannerSettings())
    assert limits.limiter.backend == "memory"
    assert limits.limit("any") == Limit(requests=60, tokens=10000)
    assert limits.limit("big") == Limit(requests=5, tokens=10000)
    assert limits.limit("free").unlimited
    monkeypatch.setenv("TRELLIS_MODEL_RATE_LIMITS", '{"big": {"rpm": -1}}')
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        PlannerSettings()
    monkeypatch.setenv("TRELLIS_MODEL_RATE_LIMITS", '{"big": {"qps": 1}}')
    with pytest.raises(ValueError, match="qps"):
        PlannerSettings()
    monkeypatch.delenv("TRELLIS_MODEL_RATE_LIMITS")
    monkeypatch.setenv("TRELLIS_REDIS_URL", "localhost:6379")
    with pytest.raises(ValueError, match="redis://"):
        PlannerSettings()
