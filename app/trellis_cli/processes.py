"""The stack as processes for the soak and the benchmarks: the offline model and the
five services, each ``python -m <module>`` on free loopback ports.

``trellis up`` runs the same modules on fixed ports and its start-up waits are reused
here. Each process keeps its SQLite files and log in a work directory, has no metrics
port and logs warnings only; tracing exports nothing unless the caller's environment
says so (``common_env`` with ``OTEL_EXPORTER_OTLP_ENDPOINT``...). The environment is this
one without ``TRELLIS_*``/``OTEL_*`` variables, plus the caller's (store URLs, API keys,
OTLP endpoint). Processes are stopped by their own PIDs (SIGTERM, then SIGKILL after a
grace).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.runtime.ports import free_port
from trellis_cli.up import MODEL, SERVICES, stop_all, wait_http, wait_serving

#: Seconds each process gets to report ready.
STARTUP_SECONDS = 60.0


@dataclass
class Proc:
    """One started process: its name, port, log file and OS process."""

    name: str
    port: int
    log: Path
    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ProcessStack:
    """The running processes, callees first (model, cache, costs, gateway, planner, executor)."""

    workdir: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def executor_target(self) -> str:
        return f"127.0.0.1:{self.procs['executor'].port}"

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.procs[name].port}"

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    @property
    def service_pids(self) -> dict[str, int]:
        """The five services' PIDs (the offline model left out)."""
        return {name: proc.pid for name, proc in self.procs.items() if name != MODEL.name}

    def dead(self) -> dict[str, int | None]:
        """Processes that exited, with their exit codes."""
        return {n: p.process.returncode for n, p in self.procs.items() if not p.alive}

    async def serving(self) -> dict[str, bool]:
        """Whether each gRPC service still answers its health check SERVING (the model:
        whether its process is alive)."""
        result: dict[str, bool] = {}
        for name, proc in self.procs.items():
            if name == MODEL.name:
                result[name] = proc.alive
                continue
            try:
                async with aio.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5.0
                    )
                result[name] = reply.status == health_pb2.HealthCheckResponse.SERVING
            except aio.AioRpcError:
                result[name] = False
        return result

    async def stop(self) -> None:
        await stop_all([proc.process for proc in reversed(self.procs.values())])


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OTEL_"))}
    env.update(PYTHONUNBUFFERED="1", OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    return env


async def start_process_stack(
    workdir: Path,
    *,
    model_line_delay_ms: float = 0.0,
    common_env: Mapping[str, str] | None = None,
    per_service: Mapping[str, Mapping[str, str]] | None = None,
) -> ProcessStack:
    """Start the model and the five services in ``workdir``; return once all are ready.

    ``common_env`` goes to every service (a PostgreSQL ``TRELLIS_DATABASE_URL`` replaces
    the per-service SQLite files; the OTLP endpoint), ``per_service[name]`` to one (e.g.
    the executor's ``TRELLIS_API_KEYS``). On a start-up failure everything started is
    stopped and ``RuntimeError`` carries the failing process's log.
    """
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    stack = ProcessStack(workdir)
    ports = {spec.name: free_port() for spec in (MODEL, *SERVICES)}
    targets = {f"TRELLIS_{s.name.upper()}_TARGET": f"127.0.0.1:{ports[s.name]}" for s in SERVICES}
    base = _base_env()
    try:
        model_env = {
            **base,
            "TRELLIS_OFFLINE_MODEL_PORT": str(ports[MODEL.name]),
            "TRELLIS_OFFLINE_MODEL_LINE_DELAY_MS": str(model_line_delay_ms),
        }
        await _spawn(stack, MODEL.name, MODEL.module, ports[MODEL.name], model_env)
        for spec in SERVICES:
            env = {
                **base,
                **targets,
                "OPENAI_BASE_URL": f"http://127.0.0.1:{ports[MODEL.name]}/v1",
                "OPENAI_API_KEY": "offline",
                "TRELLIS_HOST": "127.0.0.1",
                "TRELLIS_PORT": str(ports[spec.name]),
                "TRELLIS_METRICS_PORT": "0",
                "TRELLIS_LOG_LEVEL": "warning",
                "TRELLIS_DATABASE_URL": f"sqlite:///{workdir / spec.name}.db",
                "TRELLIS_OUTBOX_PATH": str(workdir / f"{spec.name}-outbox.db"),
                **(common_env or {}),
                **(per_service or {}).get(spec.name, {}),
            }
            await _spawn(stack, spec.name, spec.module, ports[spec.name], env)
    except BaseException:
        await stack.stop()
        raise
    return stack


async def _spawn(stack: ProcessStack, name: str, module: str, port: int, env: dict) -> None:
    log = stack.workdir / f"{name}.log"
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    proc = stack.procs[name] = Proc(name, port, log, process)
    ready = asyncio.ensure_future(
        wait_http(port, STARTUP_SECONDS)
        if name == MODEL.name
        else wait_serving(port, STARTUP_SECONDS)
    )
    exited = asyncio.ensure_future(process.wait())
    done, _ = await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
    exited.cancel()
    if ready not in done:
        ready.cancel()
        raise RuntimeError(f"{name} exited with {process.returncode} at start-up:\n{proc.tail()}")
    try:
        ready.result()
    except TimeoutError as error:
        raise RuntimeError(f"{name} did not start: {error}\n{proc.tail()}") from None
