"""Start-up problems a person must fix stop a service process with one line and exit 2:
a port another process holds (gRPC, metrics, the offline model's), a PostgreSQL URL that
cannot be used. Real processes, real sockets, a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.runtime.ports import free_port as _free_port


def _env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OTEL_"))}
    return {**env, "OTEL_TRACES_EXPORTER": "none", "TRELLIS_AUTH": "false", **variables}


def run(module: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """``python -m module`` with ``variables``; it is expected to stop on its own."""
    return subprocess.run(
        [sys.executable, "-m", module],
        env=_env(**variables),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program (this test) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_second_service_on_the_same_port_exits_2_and_the_first_keeps_it(
    service_process,
) -> None:
    first = service_process("trellis_cache", "cache", "trellis.cache.v1.CacheService", {})
    await first.wait_serving()

    second = await asyncio.to_thread(
        run, "trellis_cache", TRELLIS_PORT=str(first.port), TRELLIS_METRICS_PORT="0"
    )

    assert one_line(second) == f"trellis-cache: TRELLIS_PORT={first.port}: port already in use"
    assert first.process.poll() is None and serving(first.port)


@pytest.mark.parametrize(
    ("module", "program"),
    [("trellis_cache", "trellis-cache"), ("trellis_executor", "trellis-executor")],
)
def test_a_busy_grpc_or_metrics_port_names_its_variable(
    held_port: int, module: str, program: str, tmp_path
) -> None:
    database = {"TRELLIS_DATABASE_URL": f"sqlite:///{tmp_path}/t.db"}
    grpc_busy = run(module, TRELLIS_PORT=str(held_port), TRELLIS_METRICS_PORT="0", **database)
    assert one_line(grpc_busy) == f"{program}: TRELLIS_PORT={held_port}: port already in use"

    metrics_busy = run(module, TRELLIS_PORT="0", TRELLIS_METRICS_PORT=str(held_port), **database)
    expected = f"{program}: TRELLIS_METRICS_PORT={held_port}: port already in use"
    assert one_line(metrics_busy) == expected


def test_the_offline_model_on_a_busy_port_exits_2(held_port: int) -> None:
    result = run("trellis_offline_model", TRELLIS_OFFLINE_MODEL_PORT=str(held_port))
    expected = f"trellis-offline-model: TRELLIS_OFFLINE_MODEL_PORT={held_port}: port already in use"
    assert one_line(result) == expected


@pytest.mark.parametrize(
    ("module", "program"),
    [("trellis_executor", "trellis-executor"), ("trellis_costs", "trellis-costs")],
)
async def test_a_postgres_url_that_cannot_be_used_stops_the_service_with_one_line(
    postgres_url: str, module: str, program: str
) -> None:
    base, _, _ = postgres_url.rpartition("/")  # postgresql://postgres@127.0.0.1:5432
    host = base.rpartition("@")[2]
    password = f"pw-{uuid.uuid4().hex}"
    missing = f"trellis_no_such_db_{uuid.uuid4().hex[:12]}"
    role = f"trellis_no_such_role_{uuid.uuid4().hex[:12]}"
    cases = {
        f"postgresql://postgres@127.0.0.1:{_free_port()}/trellis": "connection refused",
        f"{base}/{missing}": f'database "{missing}" does not exist',
        f"postgresql://{role}:{password}@{host}/postgres": f'role "{role}" does not exist',
    }
    for url, why in cases.items():
        result = await asyncio.to_thread(
            run, module, TRELLIS_PORT="0", TRELLIS_METRICS_PORT="0", TRELLIS_DATABASE_URL=url
        )
        line = one_line(result)
        shown = url.replace(f":{password}@", ":[redacted]@")
        assert line == f"{program}: TRELLIS_DATABASE_URL={shown}: {why}", line
        assert password not in result.stderr + result.stdout

    # The same server with a database that exists: the service starts.
    started = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        env=_env(TRELLIS_PORT="0", TRELLIS_METRICS_PORT="0", TRELLIS_DATABASE_URL=postgres_url),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert started.stderr is not None
        async with asyncio.timeout(60):
            while b'"event": "serving"' not in (line := await started.stderr.readline()):
                assert line, "the service stopped before serving"
    finally:
        started.kill()  # our own child, by its PID
        await started.wait()
