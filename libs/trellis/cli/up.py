"""``trellis up``: the five services (and the offline model) as separate processes.

Each service runs as ``python -m trellis_<name>`` on its default port; the command
waits until every one reports SERVING over gRPC health, then until Ctrl-C/SIGTERM,
and stops them all with SIGTERM (their graceful stop), killing stragglers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def child_env(env: dict[str, str]) -> dict[str, str]:
    child = dict(env)
    child.setdefault("OPENAI_BASE_URL", f"http://127.0.0.1:{OFFLINE_MODEL_PORT}/v1")
    return child


async def wait_serving(port: int, timeout: float) -> None:
    """Poll gRPC health on ``port`` until SERVING or ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nothing SERVING on port {port} after {timeout:g}s")
            await asyncio.sleep(0.2)


async def wait_http(port: int, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nothing listening on port {port} after {timeout:g}s") from None
            await asyncio.sleep(0.2)


def stop_all(procs: list[subprocess.Popen[bytes]], grace: float = 8.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def up(echo: callable = print, startup_timeout: float = 30.0) -> int:  # type: ignore[valid-type]
    """Start everything, wait for a signal or a crash, stop everything; return an exit code."""
    env = child_env(dict(os.environ))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for spec in planned_processes(dict(os.environ)):
            procs.append(subprocess.Popen([sys.executable, "-m", spec.module], env=env))
            waiter = wait_http if spec is MODEL else wait_serving
            await waiter(spec.port, startup_timeout)
            metrics = f", metrics :{spec.metrics_port}/metrics" if spec.metrics_port else ""
            echo(f"{spec.name:<13} pid {procs[-1].pid:<7} 127.0.0.1:{spec.port}{metrics}")
        echo("all services SERVING; Ctrl-C stops them")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                echo(f"a service exited (pid {dead[0].pid}, code {dead[0].returncode}); stopping")
                return 1
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except TimeoutError:
                pass
        return 0
    except TimeoutError as error:
        echo(f"start-up failed: {error}")
        return 1
    finally:
        stop_all(procs)
