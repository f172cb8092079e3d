"""The embedded stack: all five services in one process on loopback ports.

Still real gRPC between them (each service has its own server, channels and
tracer), plus the offline rule-based model server, so ``trellis demo`` and the
end-to-end tests exercise exactly the paths a deployment uses. The planner and the
gateway each keep their usage outbox beside the stack's SQLite file, so stacks in
different directories (tests' tmp dirs) never share one.

The executor's API-key check is off here (callers' ``x-tenant-id`` is trusted) unless
the overrides turn it on (``auth=True, api_keys={...}``); TLS overrides
(``tls_cert_file``, ``tls_key_file``, ``tls_ca_file``) put every service on mTLS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor

from trellis.runtime.server import Builder, RunningServer, start_service
from trellis.runtime.settings import ServiceSettings
from trellis.runtime.sqlite import DEFAULT_DATABASE_URL, SQLITE_PREFIX
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings
from trellis_executor.service import build as build_executor
from trellis_executor.settings import ExecutorSettings
from trellis_offline_model.server import RunningModel, start_offline_model
from trellis_planner.service import build as build_planner
from trellis_planner.settings import PlannerSettings
from trellis_toolgateway.service import build as build_toolgateway
from trellis_toolgateway.settings import GatewaySettings


@dataclass
class Stack:
    """A running embedded stack; ``stop()`` ends it."""

    model: RunningModel | None
    servers: dict[str, RunningServer] = field(default_factory=dict)

    @property
    def executor_target(self) -> str:
        return self.servers["executor"].target

    def target(self, name: str) -> str:
        return self.servers[name].target

    async def stop(self) -> None:
        for server in reversed(self.servers.values()):
            await server.stop(0.5)
        if self.model is not None:
            await self.model.stop()


def outbox_paths(*database_urls: str) -> dict[str, Path]:
    """The planner's and gateway's outbox files beside the first SQLite file among
    ``database_urls`` (``{stem}-planner-outbox.db``...); none: the settings' defaults."""
    for url in database_urls:
        path = url[len(SQLITE_PREFIX) :] if url.startswith(SQLITE_PREFIX) else ""
        if path and path != ":memory:":
            db = Path(path)
            return {
                name: db.with_name(f"{db.stem}-{name}-outbox.db")
                for name in ("planner", "toolgateway")
            }
    return {}


async def start_stack(
    *,
    database_url: str = DEFAULT_DATABASE_URL,
    costs_database_url: str | None = None,
    model_base_url: str | None = None,
    model_delay_ms: int = 0,
    span_processors: Sequence[SpanProcessor] = (),
    **overrides: object,
) -> Stack:
    """Start the offline model (unless ``model_base_url`` is given) and the five services.

    ``costs_database_url`` (default: ``database_url``) puts the ledger in a database of
    its own (e.g. the run store on PostgreSQL, the ledger in a file). The usage outboxes
    go beside the ledger's file (or the executor's; see ``outbox_paths``).
    ``overrides`` are extra settings applied to every service (e.g. ``max_parallel``);
    ``span_processors`` see every service's spans (tests pass an in-memory exporter's).
    The executor's ``auth`` is off unless an override says otherwise.
    """
    model = None
    if model_base_url is None:
        model = await start_offline_model(port=0, delay_ms=model_delay_ms)
        model_base_url = model.base_url
    stack = Stack(model)
    common = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **overrides}

    async def start(name: str, cls: type[ServiceSettings], builder: Builder, **kw: object) -> None:
        fields = cls.model_fields
        settings = cls(**{k: v for k, v in {**common, **kw}.items() if k in fields})
        stack.servers[name] = await start_service(
            settings, name, builder, span_processors=span_processors
        )

    costs_url = costs_database_url or database_url
    outboxes = {
        name: {"outbox_path": path} for name, path in outbox_paths(costs_url, database_url).items()
    }
    try:
        await start("cache", CacheSettings, build_cache)
        await start("costs", CostsSettings, build_costs, database_url=costs_url)
        await start(
            "planner",
            PlannerSettings,
            build_planner,
            costs_target=stack.target("costs"),
            openai_base_url=model_base_url,
            **outboxes.get("planner", {}),
        )
        await start(  # after the planner: its model tools call the planner
            "toolgateway",
            GatewaySettings,
            build_toolgateway,
            cache_target=stack.target("cache"),
            costs_target=stack.target("costs"),
            planner_target=stack.target("planner"),
            **outboxes.get("toolgateway", {}),
        )
        await start(
            "executor",
            ExecutorSettings,
            build_executor,
            database_url=database_url,
            planner_target=stack.target("planner"),
            toolgateway_target=stack.target("toolgateway"),
            costs_target=stack.target("costs"),
            auth=overrides.get("auth", False),
        )
    except BaseException:
        await stack.stop()
        raise
    return stack
