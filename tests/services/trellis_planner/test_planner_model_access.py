"""Model access through the real openai client against the offline model: retries that
honour Retry-After, fallback models, the budget check before each call, GenAI metrics."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY

from tests.support.model_script import script_of
from trellis.clients.costs import CostsClient
from trellis.clients.planner import PlannerClient
from trellis.costs.v1 import costs_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from trellis_costs.service import NAME as COSTS
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings
from trellis_offline_model.server import RunningModel
from trellis_planner.model import ChatModel
from trellis_planner.service import NAME, build, make_client
from trellis_planner.settings import PlannerSettings

MESSAGES = [{"role": "user", "content": "What is (17*23)+4?"}]
DEMO = "Report this machine's OS, disk usage and uptime"


def unique(prefix: str = "m") -> str:
    """A model name of this test only, so the process-wide metrics are not shared."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class FakeBudget:
    """CheckBudget as cost accounting answers it, or failing like an unreachable one."""

    allowed: bool = True
    fail: bool = False
    calls: int = 0

    async def check_budget(
        self, estimated_cost_nano_usd: int = 0, *, estimated_usage=None, reservation_id: str = ""
    ):
        self.calls += 1
        if self.fail:
            raise Unavailable("costs is down")
        return costs_pb2.CheckBudgetResponse(
            allowed=self.allowed, daily_limit_nano_usd=1000, spent_today_nano_usd=1000
        )


@dataclass
class Kit:
    model: RunningModel
    spans: InMemorySpanExporter
    made: list[ChatModel] = field(default_factory=list)

    def chat(self, *, max_retries: int = 2, timeout: float = 10.0, **kwargs) -> ChatModel:
        settings = PlannerSettings(
            openai_base_url=self.model.base_url, model_max_retries=max_retries
        )
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        chat = ChatModel(
            make_client(settings), provider.get_tracer("test"), timeout=timeout, **kwargs
        )
        self.made.append(chat)
        return chat


@pytest.fixture
async def kit(model: RunningModel):
    kit = Kit(model, InMemorySpanExporter())
    yield kit
    for chat in kit.made:
        await chat.aclose()


async def complete(chat: ChatModel, name: str, messages=MESSAGES):
    """One whole call; its ChatCall (``result`` complete)."""
    call = chat.chat(messages, model=name, run_id="run-1", step="plan")
    async with call:
        async for _ in call.deltas():
            pass
    return call


def requested(model: RunningModel) -> list[str]:
    return [body["model"] for body in model.requests]


# --- retries ----------------------------------------------------------------------------


def test_retry_count_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PlannerSettings().model_max_retries == 2
    monkeypatch.setenv("TRELLIS_MODEL_MAX_RETRIES", "5")
    settings = PlannerSettings()
    assert settings.model_max_retries == 5
    assert make_client(settings).max_retries == 5
    monkeypatch.setenv("TRELLIS_MODEL_MAX_RETRIES", "-1")
    with pytest.raises(ValueError, match="model_max_retries"):
        PlannerSettings()


async def test_429_with_retry_after_then_success(kit, model):
    name = unique()
    chat = kit.chat()
    script_of(model).fail(429, retry_after_ms=400)
    started = time.monotonic()
    call = await complete(chat, name)
    assert time.monotonic() - started >= 0.4  # the client waited as Retry-After said
    assert requested(model) == [name, name]
    assert call.result.text and not call.result.estimated
    [span] = kit.spans.get_finished_spans()  # retries are inside one logical call
    assert span.name == f"chat {name}" and span.status.status_code != StatusCode.ERROR


async def test_429_after_the_last_retry_carries_the_retry_after(kit, model):
    chat = kit.chat(max_retries=0)
    script_of(model).fail(429, retry_after_ms=1500)
    with pytest.raises(ResourceExhausted) as raised:
        await complete(chat, unique())
    assert raised.value.reason == "MODEL_RATE_LIMITED"
    assert raised.value.retry_delay == pytest.approx(1.5)
    assert len(model.requests) == 1


# --- fallback models --------------------------------------------------------------------


async def test_fallback_model_answers_when_the_primary_keeps_failing(kit, model):
    primary, backup = unique("primary"), unique("backup")
    chat = kit.chat(fallback_models=[backup])
    script_of(model).fail(500, times=3, retry_after_ms=1)  # the call and both retries
    before = REGISTRY.get_sample_value(
        "trellis_model_fallbacks_total", {"model": primary, "fallback": backup}
    )
    call = await complete(chat, primary)
    assert requested(model) == [primary] * 3 + [backup]
    assert call.result.request_model == backup and call.result.failed_models == [primary]
    assert call.opened and call.result.text
    first, second = kit.spans.get_finished_spans()  # one span per model
    assert first.name == f"chat {primary}" and first.status.status_code == StatusCode.ERROR
    assert first.attributes["error.type"] == "MODEL_UNAVAILABLE"
    assert second.name == f"chat {backup}" and second.status.status_code != StatusCode.ERROR
    assert second.attributes["gen_ai.request.model"] == backup
    assert second.attributes["trellis.fallback_from"] == primary
    after = REGISTRY.get_sample_value(
        "trellis_model_fallbacks_total", {"model": primary, "fallback": backup}
    )
    assert (after or 0) - (before or 0) == 1


async def test_fallback_when_the_primary_times_out_before_answering(kit, model):
    primary, backup = unique("primary"), unique("backup")
    chat = kit.chat(max_retries=0, timeout=0.3, fallback_models=[backup])
    script_of(model).stall(2.0)  # no response headers within the primary's timeout
    started = time.monotonic()
    call = await complete(chat, primary)
    assert time.monotonic() - started < 1.5
    assert requested(model) == [primary, backup]
    assert call.result.request_model == backup


async def test_every_model_failing_raises_the_last_failure(kit, model):
    primary, backup = unique("primary"), unique("backup")
    chat = kit.chat(max_retries=0, fallback_models=[backup, primary])  # primary not twice
    script_of(model).fail(503, times=2, retry_after_ms=1)
    with pytest.raises(Unavailable) as raised:
        await complete(chat, primary)
    assert raised.value.reason == "MODEL_UNAVAILABLE"
    assert raised.value.metadata["model"] == backup
    assert requested(model) == [primary, backup]


async def test_no_fallback_once_tokens_have_streamed(kit, model):
    primary, backup = unique("primary"), unique("backup")
    chat = kit.chat(max_retries=0, timeout=0.5, fallback_models=[backup])
    model.state.delay_ms = 100  # tokens flow, but the whole answer takes far longer
    seen = []
    call = chat.chat(MESSAGES, model=primary)
    with pytest.raises(DeadlineExceeded) as raised:
        async with call:
            async for text in call.deltas():
                seen.append(text)
    assert raised.value.reason == "MODEL_TIMEOUT"
    assert seen  # the caller already has text: it cannot be taken back by another model
    assert requested(model) == [primary]
    assert call.opened and call.result.estimated and call.result.output_tokens > 0
    [span] = kit.spans.get_finished_spans()
    assert span.attributes["error.type"] == "MODEL_TIMEOUT"


async def test_no_fallback_for_a_rejected_request(kit, model):
    chat = kit.chat(fallback_models=[unique("backup")])
    script_of(model).fail(400, message="bad request")
    with pytest.raises(FailedPrecondition) as raised:
        await complete(chat, (primary := unique()))
    assert raised.value.reason == "MODEL_REJECTED"
    assert requested(model) == [primary]


def test_fallback_models_setting_takes_a_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PlannerSettings().fallback_models == []
    monkeypatch.setenv("TRELLIS_FALLBACK_MODELS", "gpt-4o-mini, gpt-4o ,gpt-4o-mini")
    assert PlannerSettings().fallback_models == ["gpt-4o-mini", "gpt-4o"]
    monkeypatch.setenv("TRELLIS_FALLBACK_MODELS", '["a", "b"]')
    assert PlannerSettings().fallback_models == ["a", "b"]
    monkeypatch.setenv("TRELLIS_FALLBACK_MODELS", "a,,b")
    with pytest.raises(ValueError, match="must not be empty"):
        PlannerSettings()


# --- budget -----------------------------------------------------------------------------


async def test_over_budget_no_model_call_is_made(kit, model):
    budget = FakeBudget(allowed=False)
    chat = kit.chat(budget=budget, fallback_models=[unique()])
    with pytest.raises(ResourceExhausted) as raised:
        await complete(chat, unique())
    assert raised.value.reason == "BUDGET_EXCEEDED"
    assert budget.calls == 1
    assert len(model.requests) == 0
    assert kit.spans.get_finished_spans() == ()


async def test_within_budget_the_call_is_made(kit, model):
    budget = FakeBudget(allowed=True)
    call = await complete(kit.chat(budget=budget), unique())
    assert budget.calls == 1 and len(model.requests) == 1 and call.result.text


async def test_unreachable_cost_accounting_does_not_stop_planning(kit, model):
    budget = FakeBudget(fail=True)
    call = await complete(kit.chat(budget=budget), unique())
    assert budget.calls == 1 and len(model.requests) == 1 and call.result.text


async def test_budget_exceeded_over_grpc_with_real_cost_accounting(
    serve, channels, model, tools, tmp_path
):
    costs_server = await serve(
        COSTS,
        build_costs,
        CostsSettings(port=0, metrics_port=0, database_url=f"sqlite:///{tmp_path}/ledger.db"),
    )
    planner_server = await serve(
        NAME,
        build,
        PlannerSettings(
            port=0,
            metrics_port=0,
            openai_base_url=model.base_url,
            costs_target=costs_server.target,
        ),
    )
    costs = CostsClient(channels.get(costs_server.target))
    planner = PlannerClient(channels.get(planner_server.target), timeout=30)

    async def plan(run_id: str) -> list[planner_pb2.PlanResponse]:
        request = planner_pb2.PlanRequest(run_id=run_id, goal=DEMO, tools=tools)
        return [event async for event in planner.plan(request)]

    with context.request_scope(tenant_id="acme"):
        events = await plan("r1")  # no budget yet
        spent = events[-1].done.usage.cost_nano_usd
        assert spent > 0 and len(model.requests) == 1
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(tenant_id="acme", daily_limit_nano_usd=spent)
        )
        with pytest.raises(ResourceExhausted) as raised:
            await plan("r2")  # the limit is spent: no estimate fits
    assert raised.value.reason == "BUDGET_EXCEEDED"
    assert len(model.requests) == 1  # the model never saw the second plan
    with context.request_scope(tenant_id="tight"):
        await costs.set_budget(
            costs_pb2.SetBudgetRequest(tenant_id="tight", daily_limit_nano_usd=1)
        )
        with pytest.raises(ResourceExhausted):  # nothing spent, but the call's estimate is over
            await plan("r3")
    assert len(model.requests) == 1
    with context.request_scope(tenant_id="other"):  # budgets are per tenant
        await plan("r4")
    assert len(model.requests) == 2


# --- telemetry --------------------------------------------------------------------------


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_genai_metrics_are_observed_per_call(kit, model):
    name = unique()
    labels = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": name,
        "gen_ai_response_model": "trellis-offline-rules-v1",  # what the endpoint says it is
    }
    call = await complete(kit.chat(), name)
    result = call.result
    for kind, tokens in (("input", result.input_tokens), ("output", result.output_tokens)):
        token_labels = {**labels, "gen_ai_token_type": kind}
        assert sample("gen_ai_client_token_usage_count", token_labels) == 1
        assert sample("gen_ai_client_token_usage_sum", token_labels) == tokens > 0
    ok = {**labels, "error_type": ""}
    assert sample("gen_ai_client_operation_duration_seconds_count", ok) == 1
    assert 0 < sample("gen_ai_client_operation_duration_seconds_sum", ok) < 5

    script_of(model).fail(500, times=3, retry_after_ms=1)
    with pytest.raises(Unavailable):
        await complete(kit.chat(), name)
    failed = {**labels, "gen_ai_response_model": name, "error_type": "MODEL_UNAVAILABLE"}
    assert sample("gen_ai_client_operation_duration_seconds_count", failed) == 1
    no_answer = {**labels, "gen_ai_response_model": name, "gen_ai_token_type": "input"}
    assert sample("gen_ai_client_token_usage_count", no_answer) == 0  # nothing was spent


async def test_span_has_time_to_first_chunk(kit, model):
    await complete(kit.chat(), unique())
    [span] = kit.spans.get_finished_spans()
    ttfc = span.attributes["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttfc < 5
    assert span.attributes["gen_ai.usage.input_tokens"] > 0
