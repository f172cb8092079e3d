"""Wires the planner core and servicer into a server (standalone or embedded).

One ``AsyncOpenAI`` client (one HTTP connection pool) per planner, retrying 429, 5xx
and connection errors ``TRELLIS_MODEL_MAX_RETRIES`` times as Retry-After says; the
model rate limits and breakers in Redis when ``TRELLIS_REDIS_URL`` is set (shared by
all replicas), else in this process; the plan format chosen per model; the budget
checked with cost accounting before every model call;
usage delivered through the durable outbox at ``TRELLIS_OUTBOX_PATH``, whose
redelivery loop runs with the service and is flushed when it stops. The gateway's
model and embed tools call the same model access through Generate and Embed.
"""

from __future__ import annotations

from grpc import aio
from openai import AsyncOpenAI

from trellis.clients.budget_check import BudgetPolicy
from trellis.clients.costs import CostsClient
from trellis.clients.usage_outbox import UsageOutbox
from trellis.planner.v1 import planner_pb2, planner_pb2_grpc
from trellis.runtime.channels import Channels
from trellis.runtime.logs import get_logger
from trellis.runtime.server import Service
from trellis.runtime.telemetry import Telemetry, instrument_redis
from trellis_planner.breaker import BreakerConfig, InProcessBreakers, ModelBreakers, RedisBreakers
from trellis_planner.core import Planner
from trellis_planner.formats import FormatChooser
from trellis_planner.generate import Generator
from trellis_planner.model import ChatModel
from trellis_planner.ratelimit import (
    InProcessRateLimiter,
    Limit,
    RateLimiter,
    RateLimits,
    RedisRateLimiter,
)
from trellis_planner.servicer import PlannerServicer
from trellis_planner.settings import PlannerSettings
from trellis_planner.summarize import Summarizer

NAME = "planner"
SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name

log = get_logger(__name__)


def make_client(settings: PlannerSettings) -> AsyncOpenAI:
    """The process's one client: its timeout bounds each attempt, the call's deadline all."""
    return AsyncOpenAI(
        base_url=settings.openai_base_url,
        api_key=settings.openai_api_key.get_secret_value(),
        timeout=settings.model_timeout_seconds,
        max_retries=settings.model_max_retries,
    )


def make_rate_limits(settings: PlannerSettings, telemetry: Telemetry | None = None) -> RateLimits:
    """The limits ``settings`` give, in Redis (commands traced) or in this process."""
    limiter: RateLimiter
    if settings.redis_url:
        redis_limiter = RedisRateLimiter.from_url(settings.redis_url)
        if telemetry is not None:
            instrument_redis(telemetry, redis_limiter.client)
        limiter = redis_limiter
    else:
        limiter = InProcessRateLimiter()
    default = Limit(requests=settings.model_rpm, tokens=settings.model_tpm)
    per_model = {
        name: Limit(
            requests=default.requests if override.rpm is None else override.rpm,
            tokens=default.tokens if override.tpm is None else override.tpm,
        )
        for name, override in settings.model_rate_limits.items()
    }
    return RateLimits(
        limiter,
        default=default,
        per_model=per_model,
        expected_output_tokens=settings.model_expected_output_tokens,
    )


def make_breakers(
    settings: PlannerSettings, telemetry: Telemetry | None = None
) -> ModelBreakers | None:
    """The model breakers ``settings`` give (None: off), in Redis or in this process."""
    config = BreakerConfig(
        failures=settings.model_breaker_failures,
        cooldown=settings.model_breaker_cooldown_seconds,
    )
    if not config.enabled:
        return None
    if settings.redis_url:
        breakers = RedisBreakers.from_url(settings.redis_url, config)
        if telemetry is not None:
            instrument_redis(telemetry, breakers.client)
        return breakers
    return InProcessBreakers(config)


async def build(settings: PlannerSettings, telemetry: Telemetry, channels: Channels) -> Service:
    costs = CostsClient(channels.get(settings.costs_target))
    rate_limits = make_rate_limits(settings, telemetry)
    breakers = make_breakers(settings, telemetry)
    formats = FormatChooser(settings.plan_format, settings.model_plan_formats)
    log.info(
        "model access",
        model=settings.model,
        plan_format=formats.choose(settings.model).value,
        fallback_models=settings.fallback_models,
        rate_limits=rate_limits.limiter.backend,
        breakers=breakers.backend if breakers is not None else "off",
        max_retries=settings.model_max_retries,
    )
    model = ChatModel(
        make_client(settings),
        telemetry.tracer,
        timeout=settings.model_timeout_seconds,
        fallback_models=settings.fallback_models,
        rate_limits=rate_limits,
        budget=costs,
        budget_policy=BudgetPolicy.of(settings),
        expected_output_tokens=settings.model_expected_output_tokens,
        breakers=breakers,
    )
    try:
        outbox = await UsageOutbox.open(
            settings.outbox_path, costs.record_usage, batch_sender=costs.record_usages
        )
    except BaseException:
        await model.aclose()
        raise
    planner = Planner(
        model,
        outbox,
        default_model=settings.model,
        max_nodes=settings.max_nodes,
        max_line_bytes=settings.max_plan_line_bytes,
        max_goal_bytes=settings.max_goal_bytes,
        formats=formats,
    )
    generator = Generator(
        model,
        outbox,
        default_model=settings.model,
        embedding_model=settings.embedding_model,
    )
    summarizer = Summarizer(model, outbox, default_model=settings.model)
    servicer = PlannerServicer(planner, generator, summarizer)

    def register(server: aio.Server) -> None:
        planner_pb2_grpc.add_PlannerServiceServicer_to_server(servicer, server)

    async def aclose() -> None:
        await outbox.aclose()  # before the channels close: in-flight usage is flushed
        await model.aclose()

    outbox.start()
    return Service(NAME, [SERVICE_NAME], register, aclose=aclose)
