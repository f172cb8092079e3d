"""``trellis up``: the five services (and the offline model) as separate processes.

Each service runs as ``python -m trellis_<name>`` on 127.0.0.1, on its default ports or,
with ``--port-base B``, on a block of its own: the offline model on B, the services' gRPC
ports B+1..B+5 (executor, planner, toolgateway, cache, costs: the order of the default
ports 50051..50055) and each one's metrics port 10 above its gRPC port. Every child is
told its own ports and the others' addresses; ports and addresses inherited from the
environment (``TRELLIS_PORT``, ``TRELLIS_EXECUTOR_TARGET``...) do not reach them.

Before anything starts every port is checked: a busy one (another ``trellis up``, say)
stops the command with one line naming it. Then each process is started and awaited until
it reports SERVING over gRPC health (the model: accepts connections), then Ctrl-C/SIGTERM
stops them all with SIGTERM (their graceful stop), killing stragglers. The children's logs
go to this command's stderr; a child that exits is named with the last error line it
wrote, and the rest are stopped.

The executor requires API keys (``TRELLIS_AUTH`` defaults to on). When the environment
says nothing about auth (no ``TRELLIS_AUTH``, ``TRELLIS_API_KEYS``,
``TRELLIS_API_KEYS_FILE``), ``up`` makes a development key for tenant ``default``,
configures the executor with its hash and prints it once, for ``TRELLIS_API_KEY``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.runtime import auth, context, tls
from trellis.runtime.channels import CONNECTION_OPTIONS
from trellis.runtime.ports import bind_error
from trellis.runtime.settings import ServiceSettings, env_name

HOST = "127.0.0.1"
OFFLINE_MODEL_PORT = 8400
#: Without --port-base the services' gRPC ports are this plus 1..5.
DEFAULT_PORT_BASE = 50050
#: A --port-base block: the model, five gRPC ports, a gap, five metrics ports.
PORT_BLOCK = 16
METRICS_OFFSET = 10


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    module: str
    port: int
    metrics_port: int | None


SERVICES = [
    ProcessSpec("cache", "trellis_cache", 50054, 9104),
    ProcessSpec("costs", "trellis_costs", 50055, 9105),
    ProcessSpec("toolgateway", "trellis_toolgateway", 50053, 9103),
    ProcessSpec("planner", "trellis_planner", 50052, 9102),
    ProcessSpec("executor", "trellis_executor", 50051, 9101),
]
MODEL = ProcessSpec("offline-model", "trellis_offline_model", OFFLINE_MODEL_PORT, None)

#: The variables each child is given its own value of (none is inherited).
PORT = env_name(ServiceSettings, "port")
METRICS_PORT = env_name(ServiceSettings, "metrics_port")
SERVICE_HOST = env_name(ServiceSettings, "host")
MODEL_PORT = "TRELLIS_OFFLINE_MODEL_PORT"
MODEL_HOST = "TRELLIS_OFFLINE_MODEL_HOST"
TARGETS = {spec.name: env_name(ServiceSettings, f"{spec.name}_target") for spec in SERVICES}
STACK_VARIABLES = (SERVICE_HOST, PORT, METRICS_PORT, MODEL_HOST, MODEL_PORT, *TARGETS.values())


def moved(spec: ProcessSpec, base: int) -> ProcessSpec:
    """``spec`` in the --port-base block starting at ``base``."""
    if spec.metrics_port is None:
        return replace(spec, port=base)
    port = base + spec.port - DEFAULT_PORT_BASE
    return replace(spec, port=port, metrics_port=port + METRICS_OFFSET)


def planned_processes(env: Mapping[str, str], port_base: int | None = None) -> list[ProcessSpec]:
    """The processes to start, on their ports. The offline model runs too unless
    OPENAI_BASE_URL points elsewhere."""
    specs = SERVICES if env.get("OPENAI_BASE_URL") else [MODEL, *SERVICES]
    return specs if port_base is None else [moved(spec, port_base) for spec in specs]


#: Variables by which the environment decides the executor's auth itself.
AUTH_VARIABLES = ("TRELLIS_AUTH", "TRELLIS_API_KEYS", "TRELLIS_API_KEYS_FILE")


def child_env(env: Mapping[str, str], specs: list[ProcessSpec]) -> dict[str, str]:
    """What every child shares: ``env`` without inherited ports and addresses, plus the
    addresses of the stack's services and model."""
    child = {k: v for k, v in env.items() if k not in STACK_VARIABLES}
    for spec in specs:
        if spec.metrics_port is None:
            child.setdefault("OPENAI_BASE_URL", f"http://{HOST}:{spec.port}/v1")
        else:
            child[TARGETS[spec.name]] = f"{HOST}:{spec.port}"
    return child


def process_env(shared: Mapping[str, str], spec: ProcessSpec) -> dict[str, str]:
    """``shared`` plus the host and ports ``spec``'s process listens on."""
    if spec.metrics_port is None:
        return {**shared, MODEL_HOST: HOST, MODEL_PORT: str(spec.port)}
    return {
        **shared,
        SERVICE_HOST: HOST,
        PORT: str(spec.port),
        METRICS_PORT: str(spec.metrics_port),
    }


def busy_ports(specs: list[ProcessSpec]) -> str | None:
    """One line naming every port of ``specs`` that cannot be listened on; None: all free."""
    in_use, other = [], []
    for spec in specs:
        for port, label in ((spec.port, spec.name), (spec.metrics_port, f"{spec.name} metrics")):
            if port is None:
                continue
            error = bind_error(HOST, port)
            if error is not None and error.errno == errno.EADDRINUSE:
                in_use.append(f"{port} ({label})")
            elif error is not None:
                other.append(f"{port} ({label}: {error.strerror or error})")
    if not (in_use or other):
        return None
    parts = []
    if in_use:
        parts.append(
            f"ports already in use: {', '.join(in_use)}; is another `trellis up` running?"
            " Stop it, or move this stack with --port-base N"
        )
    if other:
        parts.append(f"cannot listen on {', '.join(other)}")
    return "; ".join(parts)


def dev_key(env: dict[str, str]) -> str | None:
    """When ``env`` says nothing about auth: a new key for tenant ``default``, whose hash
    goes into ``env`` as ``TRELLIS_API_KEYS``; else None (``env`` untouched)."""
    if any(env.get(name, "").strip() for name in AUTH_VARIABLES):
        return None
    key = auth.new_key()
    env["TRELLIS_API_KEYS"] = json.dumps({auth.hash_key(key): context.DEFAULT_TENANT})
    return key


async def wait_serving(
    port: int, within: float, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Poll gRPC health on ``port`` until SERVING, for at most ``within`` seconds
    (over TLS with ``credentials``)."""
    deadline = asyncio.get_running_loop().time() + within
    target = f"{HOST}:{port}"
    # Polled while the service starts: a reconnect back-off growing unbounded would see
    # it SERVING seconds late.
    channel = (
        aio.insecure_channel(target, options=CONNECTION_OPTIONS)
        if credentials is None
        else aio.secure_channel(target, credentials, options=CONNECTION_OPTIONS)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nothing SERVING on port {port} after {within:g}s")
            await asyncio.sleep(0.2)


async def wait_http(port: int, within: float) -> None:
    """Wait until something accepts TCP connections on ``port``."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nothing listening on port {port} after {within:g}s") from None
            await asyncio.sleep(0.2)


async def stop_all(procs: Sequence[asyncio.subprocess.Process], grace: float = 8.0) -> None:
    """Stop ``procs`` one after the other, callers first: SIGTERM (the service's graceful
    stop) and wait, so that each still reaches what it calls while it stops (the
    executor's runs end; the gateway's last usage reaches cost accounting); SIGKILL
    whatever is left once ``grace`` seconds have passed in all."""
    deadline = asyncio.get_running_loop().time() + grace
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout_at(deadline):
                await proc.wait()
        except TimeoutError:
            break
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def error_line(line: str) -> str | None:
    """What a child's stderr line says went wrong, or None when it is not an error.

    A JSON log line counts when its level is error or worse (its event, its ``error`` and
    the last line of its exception); any other text counts as is (the one-line start-up
    errors, the last line of a traceback).
    """
    text = line.strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return text
    if not isinstance(record, dict):
        return text
    if record.get("level") not in ("error", "critical", "exception"):
        return None
    parts = [str(record.get("event", ""))]
    if record.get("error"):
        parts.append(str(record["error"]))
    if record.get("exception"):
        parts.append(str(record["exception"]).strip().splitlines()[-1])
    return ": ".join(p for p in parts if p)


@dataclass
class Child:
    """A started process, its stderr relayed to ours, its last error line kept."""

    spec: ProcessSpec
    process: asyncio.subprocess.Process
    last_error: str = ""
    _relay: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, spec: ProcessSpec, env: dict[str, str]) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", spec.module, env=env, stderr=asyncio.subprocess.PIPE
        )
        child = cls(spec, process)
        child._relay = asyncio.ensure_future(child._relay_stderr())
        return child

    async def _relay_stderr(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            self.last_error = error_line(line) or self.last_error

    async def exit_line(self) -> str:
        """``<name> exited (code N): <its last error line>``, once its stderr is read."""
        if self._relay is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._relay), 2.0)
            except TimeoutError:
                pass  # something it started still holds the pipe: report what was read
        said = self.last_error or "no error was logged"
        return f"{self.spec.name} exited (code {self.process.returncode}): {said}"

    async def ready(self, within: float, credentials: grpc.ChannelCredentials | None) -> bool:
        """True once it serves; False if it exits first; TimeoutError after ``within``."""
        if self.spec.metrics_port is None:
            waiting = asyncio.ensure_future(wait_http(self.spec.port, within))
        else:
            waiting = asyncio.ensure_future(wait_serving(self.spec.port, within, credentials))
        exited = asyncio.ensure_future(self.process.wait())
        await asyncio.wait([waiting, exited], return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            waiting.cancel()
            return False
        exited.cancel()
        waiting.result()
        return True


async def up(
    echo: Callable[[str], object] = print,
    fail: Callable[[str], object] | None = None,
    *,
    port_base: int | None = None,
    startup_seconds: float = 30.0,
) -> int:
    """Start everything, wait for a signal or a crash, stop everything; return an exit
    code: 0 after Ctrl-C, 1 when a process failed or exited, 2 for a configuration problem
    (busy ports, bad TLS files, a child that stopped on its own configuration)."""
    fail = fail or (lambda line: print(line, file=sys.stderr))
    specs = planned_processes(os.environ, port_base)
    env = child_env(os.environ, specs)
    key = dev_key(env)
    try:
        files = tls.from_env(env)
    except tls.TlsConfigError as error:
        fail(f"invalid configuration: {error}")
        return 2
    busy = busy_ports(specs)
    if busy is not None:
        fail(busy)
        return 2
    credentials = None if files is None else files.channel_credentials()
    children: list[Child] = []
    try:
        for spec in specs:
            child = await Child.start(spec, process_env(env, spec))
            children.append(child)
            if not await child.ready(startup_seconds, credentials):
                fail(f"{await child.exit_line()}; stopping the rest")
                return 2 if child.process.returncode == 2 else 1
            metrics = f", metrics :{spec.metrics_port}/metrics" if spec.metrics_port else ""
            echo(f"{spec.name:<13} pid {child.process.pid:<7} {HOST}:{spec.port}{metrics}")
        if key is not None:
            echo(f"development API key (tenant {context.DEFAULT_TENANT}, valid until Ctrl-C):")
            echo(f"  export TRELLIS_API_KEY={key}")
        echo("all services SERVING; Ctrl-C stops them")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        exits = {asyncio.ensure_future(c.process.wait()): c for c in children}
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stopping not in done:
            dead = next(exits[task] for task in exits if task in done)
            fail(f"{await dead.exit_line()}; stopping the rest")
            return 1
        return 0
    except TimeoutError as error:
        fail(f"start-up failed: {error}")
        return 1
    finally:
        await stop_all([c.process for c in reversed(children)])
