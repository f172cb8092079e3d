"""Wires the gateway core and servicer into a server (standalone or embedded).

The registry lives in a ``RegistryHolder`` that the tools-file watcher swaps on reload;
the invoker and servicer read tools through it, so they never hold a stale registry.
HTTP tools share one pooled ``httpx.AsyncClient`` owned here: created with the service,
closed with it, never following redirects and ignoring proxy/netrc environment.
Each tool execution is recorded with cost accounting (``costs_target``) through the
durable usage outbox at ``TRELLIS_OUTBOX_PATH``, in the background; the outbox is
flushed (or written to its file) when the service stops.

Model and embed tools call models through the planner (``planner_target``: its
Generate and Embed), which owns model access.

Side-effecting calls keep their idempotency keys in Redis with ``TRELLIS_REDIS_URL``
(``idempotency``), else in this process. On stop, runs whose callers left get the
grace period to store their outcome; the rest are abandoned (unknown, never rerun).

The tools file's ``warm`` calls are made before the service is returned (so before it
serves) and again after each reload, which first drops the cached results of tools
that changed (``warming``, ``Invoker.reloaded``).
"""

from __future__ import annotations

import httpx
from grpc import aio

from trellis.clients.cache import CacheClient
from trellis.clients.costs import CostsClient
from trellis.clients.planner import PlannerClient
from trellis.clients.usage_outbox import UsageOutbox
from trellis.runtime.channels import Channels
from trellis.runtime.logs import get_logger
from trellis.runtime.server import Service
from trellis.runtime.telemetry import Telemetry
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc
from trellis_toolgateway.cache_admin import CacheAdmins
from trellis_toolgateway.invoker import Invoker
from trellis_toolgateway.loader import LoadOptions
from trellis_toolgateway.policy.breaker import BreakerConfig
from trellis_toolgateway.policy.idempotency import StoreUnavailable
from trellis_toolgateway.redis_idempotency import RedisIdempotencyStore, open_idempotency_store
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.reload import ToolsFileWatcher
from trellis_toolgateway.servicer import ToolGatewayServicer
from trellis_toolgateway.settings import GatewaySettings
from trellis_toolgateway.tenancy import TenantTools
from trellis_toolgateway.tool_usage import ToolUsage
from trellis_toolgateway.warming import warm

log = get_logger(__name__)

NAME = "toolgateway"
SERVICE_NAME = toolgateway_pb2.DESCRIPTOR.services_by_name["ToolGatewayService"].full_name


def http_client() -> httpx.AsyncClient:
    """The one client every HTTP tool uses (connection pooling across tools and calls)."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,  # no proxies or .netrc credentials picked up from the environment
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        timeout=httpx.Timeout(10.0),
    )


async def build(settings: GatewaySettings, telemetry: Telemetry, channels: Channels) -> Service:
    client = http_client()
    options = LoadOptions(
        command_timeout=settings.command_timeout_seconds,
        command_max_output_bytes=settings.command_max_output_bytes,
        max_result_bytes=settings.tool_max_result_bytes,
        max_message_bytes=settings.max_message_bytes,
        http_client=client,
        channels=channels,
        source_timeout=settings.tool_source_list_seconds,
        source_connect_timeout=settings.tool_source_connect_seconds,
        source_retry_max=settings.tool_source_retry_max_seconds,
        model_access=PlannerClient(channels.get(settings.planner_target)),
    )
    watcher = ToolsFileWatcher(settings.tools_path, options, interval=settings.tools_reload_seconds)
    costs = CostsClient(channels.get(settings.costs_target))
    try:
        outbox = await UsageOutbox.open(
            settings.outbox_path,
            costs.record_usage,
            batch_sender=costs.record_usages,
            batch_window=settings.usage_batch_seconds,
            free_window=settings.usage_free_batch_seconds,
        )
    except BaseException:
        await client.aclose()
        raise
    try:
        registry = await watcher.load()
    except BaseException:
        await outbox.aclose()
        await client.aclose()
        raise
    outbox.start()
    cache = CacheClient(channels.get(settings.cache_target), timeout=settings.cache_timeout_seconds)
    idempotency = open_idempotency_store(
        settings.redis_url,
        timeout=settings.idempotency_redis_timeout_seconds,
        lease=settings.idempotency_lease_seconds,
        prefix=settings.idempotency_redis_prefix,
    )
    if isinstance(idempotency, RedisIdempotencyStore):
        try:
            await idempotency.ping()
        except StoreUnavailable as error:  # other tools still work; side effects wait for it
            log.warning("idempotency store unreachable at start-up", error=str(error))
    invoker = Invoker(
        registry,
        cache,
        telemetry.tracer,
        breaker=BreakerConfig(
            consecutive_failures=settings.breaker_consecutive_failures,
            failure_rate=settings.breaker_failure_rate,
            cooldown=settings.breaker_cooldown_seconds,
        ),
        queue_per_slot=settings.tool_queue_per_slot,
        idempotency=idempotency,
        idempotency_ttl=settings.idempotency_ttl_seconds,
        usage=ToolUsage(outbox),
    )
    tenant_tools = TenantTools.of(settings.tenant_tools)
    servicer = ToolGatewayServicer(
        registry, invoker, tenant_tools, CacheAdmins(settings.cache_admin_tenants)
    )

    async def after_reload(old: ToolRegistry, new: ToolRegistry) -> None:
        await invoker.reloaded(old, new)
        await warm(invoker, registry, new.warm, allowed=tenant_tools.allows)

    watcher.on_reload = after_reload
    watcher.start()
    try:
        await warm(invoker, registry, registry.current.warm, allowed=tenant_tools.allows)
    except Exception:  # a bug in warming must not keep the gateway from serving
        log.exception("warming the cache failed")

    def register(server: aio.Server) -> None:
        toolgateway_pb2_grpc.add_ToolGatewayServiceServicer_to_server(servicer, server)

    async def aclose() -> None:
        await invoker.aclose(grace=settings.grace_seconds)
        if isinstance(idempotency, RedisIdempotencyStore):
            await idempotency.aclose()
        await watcher.aclose()
        await registry.aclose()
        await client.aclose()
        await outbox.aclose()  # last: executions ending during the stop still reach it

    return Service(NAME, [SERVICE_NAME], register, aclose)
