"""``trellis up``: the five services (and the offline model) as separate processes.

Each service runs as ``python -m trellis_<name>`` on its default port; the command
waits until every one reports SERVING over gRPC health, then until Ctrl-C/SIGTERM,
and stops them all with SIGTERM (their graceful stop), killing stragglers.

The executor requires API keys (``TRELLIS_AUTH`` defaults to on). When the environment
says nothing about auth (no ``TRELLIS_AUTH``, ``TRELLIS_API_KEYS``,
``TRELLIS_API_KEYS_FILE``), ``up`` makes a development key for tenant ``default``,
configures the executor with its hash and prints it once, for ``TRELLIS_API_KEY``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.runtime import auth, context, tls

OFFLINE_MODEL_PORT = 8400


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


def planned_processes(env: dict[str, str]) -> list[ProcessSpec]:
    """The offline model runs too unless OPENAI_BASE_URL points elsewhere."""
    return SERVICES if env.get("OPENAI_BASE_URL") else [MODEL, *SERVICES]


#: Variables by which the environment decides the executor's auth itself.
AUTH_VARIABLES = ("TRELLIS_AUTH", "TRELLIS_API_KEYS", "TRELLIS_API_KEYS_FILE")


def child_env(env: dict[str, str]) -> dict[str, str]:
    child = dict(env)
    child.setdefault("OPENAI_BASE_URL", f"http://127.0.0.1:{OFFLINE_MODEL_PORT}/v1")
    return child


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
    target = f"127.0.0.1:{port}"
    channel = (
        aio.insecure_channel(target)
        if credentials is None
        else aio.secure_channel(target, credentials)
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
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nothing listening on port {port} after {within:g}s") from None
            await asyncio.sleep(0.2)


async def stop_all(procs: list[asyncio.subprocess.Process], grace: float = 8.0) -> None:
    """SIGTERM (each service's graceful stop), then SIGKILL whatever outlives ``grace``."""
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def up(echo: Callable[[str], object] = print, startup_seconds: float = 30.0) -> int:
    """Start everything, wait for a signal or a crash, stop everything; return an exit code."""
    env = child_env(dict(os.environ))
    key = dev_key(env)
    try:
        files = tls.from_env(env)
    except tls.TlsConfigError as error:
        echo(f"invalid configuration: {error}")
        return 2
    credentials = None if files is None else files.channel_credentials()
    procs: list[asyncio.subprocess.Process] = []
    try:
        for spec in planned_processes(dict(os.environ)):
            procs.append(
                await asyncio.create_subprocess_exec(sys.executable, "-m", spec.module, env=env)
            )
            if spec is MODEL:
                await wait_http(spec.port, startup_seconds)
            else:
                await wait_serving(spec.port, startup_seconds, credentials)
            metrics = f", metrics :{spec.metrics_port}/metrics" if spec.metrics_port else ""
            echo(f"{spec.name:<13} pid {procs[-1].pid:<7} 127.0.0.1:{spec.port}{metrics}")
        if key is not None:
            echo(f"development API key (tenant {context.DEFAULT_TENANT}, valid until Ctrl-C):")
            echo(f"  export TRELLIS_API_KEY={key}")
        echo("all services SERVING; Ctrl-C stops them")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        exits = [asyncio.ensure_future(p.wait()) for p in procs]
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stopping not in done:
            dead = next(p for p in procs if p.returncode is not None)
            echo(f"a service exited (pid {dead.pid}, code {dead.returncode}); stopping the rest")
            return 1
        return 0
    except TimeoutError as error:
        echo(f"start-up failed: {error}")
        return 1
    finally:
        await stop_all(procs)
