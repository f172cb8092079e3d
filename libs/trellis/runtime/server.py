"""Server bootstrap: every Trellis gRPC server is built and stopped here.

A server gets per-service health (grpc.health.v1), server reflection (method symbols
included: ``reflection.py``), message size
and concurrency limits (RESOURCE_EXHAUSTED beyond ``max_concurrent_rpcs``),
keepalive, tracing and the runtime's rules interceptor. On SIGTERM/SIGINT health
turns NOT_SERVING first, so load balancers stop sending, then in-flight RPCs get
``grace_seconds`` to finish.

A server owns its port: SO_REUSEPORT (on by default in gRPC) is turned off, so a second
process started on the same port stops with one line (``TRELLIS_PORT=50054: port already
in use``, exit code 2) instead of sharing it. The ports are checked before the service is
built (``trellis.runtime.ports``).

With ``TRELLIS_TLS_*`` set the port is mTLS (``trellis.runtime.tls``) and the service's
channels dial with the same certificate. A service that gives ``api_keys`` (the
executor, with auth on) gets every call of its own RPCs authenticated by the rules
interceptor; health and reflection stay open for probes.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import SpanProcessor

from trellis.runtime import ports, tls
from trellis.runtime.auth import ApiKeys
from trellis.runtime.channels import Channels
from trellis.runtime.interceptors import ServerRulesInterceptor
from trellis.runtime.logs import get_logger, setup_logging
from trellis.runtime.metrics import serve_metrics
from trellis.runtime.redact import register_settings
from trellis.runtime.reflection import MethodSymbolPool
from trellis.runtime.settings import (
    ServiceSettings,
    StartupError,
    env_name,
    load_settings,
    startup_errors_exit,
)
from trellis.runtime.telemetry import Telemetry, setup_telemetry

log = get_logger(__name__)


async def _nothing() -> None:
    return None


async def _no_drain(grace: float) -> None:
    return None


@dataclass
class Service:
    """What one service contributes to a server."""

    name: str
    #: Fully-qualified proto service names, for health and reflection.
    service_names: Sequence[str]
    register: Callable[[aio.Server], None]
    aclose: Callable[[], Awaitable[None]] = _nothing
    #: Called when the server stops, before in-flight RPCs are ended, with the grace
    #: period: a service whose RPCs outlive it (the executor's runs) hands them over.
    drain: Callable[[float], Awaitable[None]] = _no_drain
    #: When given, calls of ``service_names`` need one of these keys, and run as its tenant.
    api_keys: ApiKeys | None = None


#: Builds a service from its settings and runtime handles (used by __main__ and the
#: embedded stack alike).
Builder = Callable[[ServiceSettings, Telemetry, Channels], Awaitable[Service]]


def server_options(settings: ServiceSettings) -> list[tuple[str, object]]:
    """Exclusive port, message bounds, keepalive, and a maximum connection age.

    The age makes clients reconnect (GOAWAY) now and then, and a ``dns:///`` client then
    resolves again, so replicas added by an autoscaler get traffic; the grace after it is
    gRPC's default (unbounded), so a long Run stream is never cut.
    """
    options: list[tuple[str, object]] = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if settings.max_connection_age_seconds:
        options.append(
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000))
        )
    return options


@dataclass
class RunningServer:
    """A started server and what it needs to stop cleanly."""

    service: Service
    server: aio.Server
    health: HealthServicer
    port: int
    grace: float
    telemetry: Telemetry
    channels: Channels
    _stopped: bool = field(default=False, init=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, then stop accepting and let in-flight RPCs finish.

        Tracing is shut down last, whatever failed before, so the spans of the RPCs
        that just ended are exported too (in a thread: the flush blocks).
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.grace if grace is None else grace
        try:
            await self.health.enter_graceful_shutdown()
            await self.service.drain(grace)
            await self.server.stop(grace)
            await self.service.aclose()
            await self.channels.close()
        finally:
            await asyncio.to_thread(self.telemetry.shutdown)


async def start_server(
    settings: ServiceSettings, builder: Builder, *, telemetry: Telemetry, channels: Channels
) -> RunningServer:
    """Build the service and serve it on ``settings.host:settings.port``."""
    register_settings(settings)  # its SecretStr values are redacted from now on
    service = await builder(settings, telemetry, channels)
    rules = ServerRulesInterceptor(
        api_keys=service.api_keys, protected=service.service_names, tracer=telemetry.rpc_tracer
    )
    server = aio.server(
        interceptors=[rules],
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    service.register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", *service.service_names):
        await health.set(name, serving)
    reflection.enable_server_reflection(
        [
            *service.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
        pool=MethodSymbolPool(),  # `grpcurl describe <Service>.<Method>` works too
    )
    files = tls.from_settings(settings)
    try:
        port = _bind(server, settings, files)
    except BaseException:
        await service.aclose()
        raise
    await server.start()
    log.info(
        "serving",
        service=service.name,
        port=port,
        mtls=files is not None,
        auth=service.api_keys is not None,
    )
    return RunningServer(service, server, health, port, settings.grace_seconds, telemetry, channels)


def _bind(server: aio.Server, settings: ServiceSettings, files: tls.TlsFiles | None) -> int:
    """Add the listening port; a port taken since it was checked is a ``StartupError``."""
    address = f"{settings.host}:{settings.port}"
    try:
        if files is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, files.server_credentials())
    except RuntimeError:  # gRPC says "Failed to bind"; the probe says why
        ports.check_port(settings.host, settings.port, env_name(type(settings), "port"))
        raise


def check_ports(settings: ServiceSettings) -> None:
    """Both ports the service will listen on are free, or a ``StartupError`` naming one."""
    cls = type(settings)
    ports.check_port(settings.host, settings.port, env_name(cls, "port"))
    ports.check_port(settings.host, settings.metrics_port, env_name(cls, "metrics_port"))


def start_metrics(settings: ServiceSettings) -> int | None:
    """``serve_metrics`` with a port taken since it was checked as a ``StartupError``."""
    try:
        return serve_metrics(settings.metrics_port, settings.host)
    except OSError as error:
        variable = env_name(type(settings), "metrics_port")
        raise StartupError(
            ports.describe(variable, settings.host, settings.metrics_port, error)
        ) from None


async def start_service(
    settings: ServiceSettings,
    name: str,
    builder: Builder,
    *,
    span_processors: Sequence[SpanProcessor] = (),
) -> RunningServer:
    """Telemetry, channels and server for one service, as a standalone process has them.

    ``span_processors`` adds span processors besides the OTEL_* ones (tests use it).
    """
    files = tls.from_settings(settings)
    telemetry = setup_telemetry(name, processors=list(span_processors))
    channels = Channels(
        max_message_bytes=settings.max_message_bytes,
        tracer=telemetry.rpc_tracer,
        credentials=None if files is None else files.channel_credentials(),
    )
    return await start_server(settings, builder, telemetry=telemetry, channels=channels)


#: Allocations between two young-generation collections (CPython's default: 700). A
#: service allocates thousands of short-lived objects per call, nearly all freed by
#: reference counting; the default made the cycle collector a few % of every service's CPU.
GC_THRESHOLD = (20_000, 50, 100)


def tune_gc() -> None:
    """Fewer cycle collections in a service process: what start-up built (modules, settings,
    registries) is frozen out of them (``gc.freeze``) and the young generation collected
    less often. Measured: 6 % less CPU per node, 7 % more nodes/s (README "Benchmarks")."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def wait_for_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_service(
    program: str, name: str, settings_cls: type[ServiceSettings], builder: Builder
) -> None:
    """Entry point body of every service's ``__main__``.

    A ``StartupError`` raised while the service starts (a busy port, a database that
    refuses its URL, a ``ConfigError`` found while it is built) stops the process like a
    bad variable: one line on stderr, exit code 2. The ports are checked first, before
    anything is built or logged.
    """
    settings = load_settings(settings_cls, program)
    setup_logging(settings.log_level, service=name)

    async def serve() -> None:
        check_ports(settings)
        running = await start_service(settings, name, builder)
        tune_gc()
        start_metrics(settings)
        await wait_for_signal()
        log.info("stopping", service=name, grace=settings.grace_seconds)
        await running.stop()

    with startup_errors_exit(program):
        asyncio.run(serve())
