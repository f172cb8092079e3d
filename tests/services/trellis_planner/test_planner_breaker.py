"""Model breakers: a model that failed N calls in a row is skipped for the next fallback
model for a cool-down, across calls (and, through Redis, across replicas).

The breaker logic with a fake clock; then model calls through the real openai client
against the offline model, one model of it dead (``fail_model``); then two "replicas"
sharing a real redis-server, and what happens when it goes away.
"""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from tests.support.model_script import script_of
from trellis.runtime.errors import Unavailable
from trellis_planner.breaker import (
    BreakerConfig,
    InProcessBreakers,
    ModelBreakers,
    RedisBreakers,
    Verdict,
    verdict_of,
)
from trellis_planner.model import ChatModel
from trellis_planner.service import make_breakers, make_client
from trellis_planner.settings import PlannerSettings

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def state(model: str) -> float | None:
    return REGISTRY.get_sample_value("trellis_model_breaker_state", {"model": model})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_what_a_call_says_about_its_model() -> None:
    assert verdict_of(None) is Verdict.OK
    assert verdict_of("MODEL_UNAVAILABLE") is Verdict.FAIL
    assert verdict_of("MODEL_TIMEOUT") is Verdict.FAIL
    assert verdict_of("MODEL_BAD_RESPONSE") is Verdict.FAIL
    assert verdict_of("MODEL_RATE_LIMITED") is Verdict.NEUTRAL
    assert verdict_of("DEADLINE_EXCEEDED") is Verdict.NEUTRAL
    assert verdict_of("MODEL_REJECTED") is Verdict.OK  # a 4xx: the endpoint is up


async def test_failures_in_a_row_open_then_one_probe_closes_or_reopens() -> None:
    clock = Clock()
    breakers = InProcessBreakers(BreakerConfig(failures=3, cooldown=30), clock)
    name = unique("m")
    for verdict in (Verdict.FAIL, Verdict.FAIL, Verdict.OK, Verdict.FAIL, Verdict.FAIL):
        admission = await breakers.admit(name)
        assert admission.allowed
        await breakers.record(name, admission, verdict)
    assert (await breakers.admit(name)).allowed  # the success in between reset the count
    await breakers.record(name, await breakers.admit(name), Verdict.FAIL)
    denied = await breakers.admit(name)
    assert not denied.allowed and denied.retry_after == pytest.approx(30)
    assert state(name) == 2
    clock.now += 30
    probe = await breakers.admit(name)
    assert probe.allowed and probe.probe and state(name) == 1
    assert not (await breakers.admit(name)).allowed  # one probe at a time
    await breakers.record(name, probe, Verdict.FAIL)
    assert not (await breakers.admit(name)).allowed and state(name) == 2
    clock.now += 30
    probe = await breakers.admit(name)
    await breakers.record(name, probe, Verdict.NEUTRAL)  # says nothing: the next may probe
    probe = await breakers.admit(name)
    assert probe.probe
    await breakers.record(name, probe, Verdict.OK)
    assert (await breakers.admit(name)) == (await breakers.admit(name))
    assert (await breakers.admit(name)).allowed and state(name) == 0


def test_breaker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_breakers(PlannerSettings()), InProcessBreakers)
    monkeypatch.setenv("TRELLIS_MODEL_BREAKER_FAILURES", "0")
    assert make_breakers(PlannerSettings()) is None


def chat_model(base_url: str, breakers: ModelBreakers | None, fallback: list[str]):
    settings = PlannerSettings(openai_base_url=base_url, model_max_retries=0)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    chat = ChatModel(
        make_client(settings),
        provider.get_tracer("test"),
        timeout=10,
        fallback_models=fallback,
        breakers=breakers,
    )
    return chat, spans


async def complete(chat: ChatModel, name: str):
    call = chat.chat(MESSAGES, model=name)
    async with call:
        async for _ in call.deltas():
            pass
    return call


async def test_a_dead_primary_is_skipped_once_its_breaker_opens(model) -> None:
    primary, backup = unique("primary"), unique("backup")
    script = script_of(model)
    script.fail_model(primary)
    breakers = InProcessBreakers(BreakerConfig(failures=2, cooldown=60))
    chat, spans = chat_model(model.base_url, breakers, [backup])
    try:
        for _ in range(4):
            call = await complete(chat, primary)
            assert call.result.request_model == backup
        # two failed requests opened it: the next calls went straight to the backup
        assert script.models == [primary, backup, primary, backup, backup, backup]
        assert call.result.skipped_models == [primary] and call.result.failed_models == []
        last = spans.get_finished_spans()[-1]
        assert last.attributes["trellis.breaker_skipped"] == (primary,)
        assert state(primary) == 2
    finally:
        await chat.aclose()


async def test_every_breaker_open_fails_at_once_with_retry_info(model) -> None:
    primary = unique("primary")
    script_of(model).fail_model(primary)
    breakers = InProcessBreakers(BreakerConfig(failures=1, cooldown=45))
    chat, _ = chat_model(model.base_url, breakers, [])
    try:
        with pytest.raises(Unavailable):
            await complete(chat, primary)
        with pytest.raises(Unavailable) as raised:
            await complete(chat, primary)
        assert raised.value.reason == "MODEL_UNAVAILABLE"
        assert "breakers of " + primary + " are open" in raised.value.message
        assert 40 < (raised.value.retry_delay or 0) <= 45
        assert script_of(model).models == [primary]  # the second call sent nothing
    finally:
        await chat.aclose()


async def test_replicas_share_breakers_through_redis(model, redis_server) -> None:
    primary, backup = unique("primary"), unique("backup")
    script = script_of(model)
    script.fail_model(primary)
    config = BreakerConfig(failures=2, cooldown=60)
    one, _ = chat_model(model.base_url, RedisBreakers.from_url(redis_server.url, config), [backup])
    two, _ = chat_model(model.base_url, RedisBreakers.from_url(redis_server.url, config), [backup])
    try:
        await complete(one, primary)
        await complete(two, primary)  # the second failure in a row, on the other replica
        assert script.models == [primary, backup, primary, backup]
        await complete(one, primary)
        await complete(two, primary)
        assert script.models[4:] == [backup, backup]  # open for both
        redis_server.stop()  # Redis gone: each replica keeps breakers of its own
        script.revive(primary)
        call = await complete(one, primary)
        assert call.result.request_model == primary
    finally:
        await one.aclose()
        await two.aclose()
