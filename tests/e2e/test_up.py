"""`trellis up`: five processes on the default ports, each with reflection and health;
moved with --port-base; refused when a port is busy (another `trellis up`); a child that
exits is named with its last error line."""

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime.channels import Channels
from trellis.runtime.ports import bind_error
from trellis_cli.up import MODEL, PORT_BLOCK, SERVICES

EXPECTED = {
    50051: "trellis.executor.v1.ExecutorService",
    50052: "trellis.planner.v1.PlannerService",
    50053: "trellis.toolgateway.v1.ToolGatewayService",
    50054: "trellis.cache.v1.CacheService",
    50055: "trellis.costs.v1.CostAccountingService",
}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def reflected_services(port: int) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        return {
            service.name
            for response in stub.ServerReflectionInfo(iter([request]), timeout=5)
            for service in response.list_services_response.service
        }


def test_up_serves_every_service_with_reflection_and_health(tmp_path: Path) -> None:
    ports = [s.port for s in [MODEL, *SERVICES]] + [s.metrics_port for s in SERVICES]
    busy = [p for p in ports if listening(p)]
    assert not busy, f"default ports already in use, cannot test `trellis up`: {busy}"
    trellis = Path(sys.executable).parent / "trellis"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OPENAI_"))}
    proc = subprocess.Popen(
        [str(trellis), "up"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        for line in proc.stdout:  # type: ignore[union-attr]
            if "all services SERVING" in line or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "trellis up exited early"
        for port, service in EXPECTED.items():
            names = reflected_services(port)
            assert service in names and "grpc.health.v1.Health" in names, (port, names)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0
    assert not [p for p in EXPECTED if listening(p)], "services still running after Ctrl-C"


TRELLIS = Path(sys.executable).parent / "trellis"


def free_block() -> int:
    """A base whose whole --port-base block is free now."""
    for _ in range(200):
        base = random.randrange(20000, 60000, PORT_BLOCK)
        if all(bind_error("127.0.0.1", base + i) is None for i in range(PORT_BLOCK)):
            return base
    raise AssertionError("no free block of ports")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OPENAI_"))}
    return {**env, "OTEL_TRACES_EXPORTER": "none", **extra}


def up(cwd: Path, base: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(TRELLIS), "up", "--port-base", str(base)],
        cwd=cwd,
        env=clean_env(COLUMNS="300", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def served_lines(proc: subprocess.Popen[str], within: float = 120) -> list[str]:
    """What ``up`` printed until "all services SERVING" (or until it exited)."""
    lines: list[str] = []
    deadline = time.monotonic() + within
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line.rstrip("\n"))
        if "all services SERVING" in line or time.monotonic() > deadline:
            break
    return lines


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """``trellis up`` processes this test started; interrupted (by PID) afterwards."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_up_refuses_a_busy_port_with_one_line_before_starting_anything(tmp_path: Path) -> None:
    base = free_block()
    with socket.socket() as holder:
        # As servers (and free_block's probe) do: an old connection on this port still in
        # TIME_WAIT must not fail the bind (it did once in CI).
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", base + 3))  # where the tool gateway would listen
        holder.listen()
        result = subprocess.run(
            [str(TRELLIS), "up", "--port-base", str(base)],
            cwd=tmp_path,
            env=clean_env(COLUMNS="300"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        others = [base + i for i in range(PORT_BLOCK) if i != 3]
        assert not [p for p in others if listening(p)], "something was started"
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error ports already in use: {base + 3} (toolgateway);"), line
    assert "--port-base" in line
    assert "SERVING" not in result.stdout


def test_port_base_moves_the_whole_stack_and_inherited_ports_do_not_leak(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    base = free_block()
    leaked = {
        "TRELLIS_PORT": str(base + 1),  # would put every child on one port
        "TRELLIS_METRICS_PORT": str(base + 11),
        "TRELLIS_PLANNER_TARGET": "127.0.0.1:1",
        "TRELLIS_OFFLINE_MODEL_PORT": "1",
    }
    first = up(tmp_path, base, **leaked)
    started.append(first)
    lines = served_lines(first)
    assert lines and "all services SERVING" in lines[-1], (lines, first.poll())
    names = {"executor": 1, "planner": 2, "toolgateway": 3, "cache": 4, "costs": 5}
    for name, offset in names.items():
        port = base + offset
        assert reflected_services(port) >= {
            EXPECTED[50050 + offset],
            "grpc.health.v1.Health",
        }, name
        with urllib.request.urlopen(f"http://127.0.0.1:{port + 10}/metrics", timeout=5) as r:
            assert r.status == 200 and b"python_info" in r.read()
    with urllib.request.urlopen(f"http://127.0.0.1:{base}/v1/models", timeout=5) as r:
        assert r.status == 200  # the offline model, on the base port
    key = next(line.split("=", 1)[1] for line in lines if "TRELLIS_API_KEY=" in line)

    # The services reach each other in the block: a goal runs end to end.
    async def run_goal() -> executor_pb2.RunFinished:
        channels = Channels()
        try:
            client = ExecutorClient(channels.get(f"127.0.0.1:{base + 1}"), timeout=60, api_key=key)
            request = executor_pb2.RunRequest(goal="What is (17*23)+4?")
            events = [event async for event in client.run(request)]
            return events[-1].finished
        finally:
            await channels.close()

    finished = asyncio.run(run_goal())
    assert finished.status == executor_pb2.RUN_STATUS_SUCCEEDED, finished.error
    assert "395" in finished.answer

    # A second `trellis up` on the same block fails clearly, and the first keeps serving.
    second = subprocess.run(
        [str(TRELLIS), "up", "--port-base", str(base)],
        cwd=tmp_path,
        env=clean_env(COLUMNS="300"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2, second
    [line] = second.stderr.splitlines()
    assert line.startswith("error ports already in use: ") and f"{base + 1} (executor)" in line
    assert "SERVING" not in second.stdout
    assert first.poll() is None and listening(base + 1)

    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=30) == 0
    assert not [p for p in range(base, base + PORT_BLOCK) if listening(p)]


def test_a_child_that_exits_is_named_with_its_last_error_line(tmp_path: Path) -> None:
    base = free_block()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = sock.getsockname()[1]  # nothing listens there once the socket is closed
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{refused}/trellis"
    result = subprocess.run(
        [str(TRELLIS), "up", "--port-base", str(base)],
        cwd=tmp_path,
        env=clean_env(COLUMNS="300", TRELLIS_DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result
    shown = url.replace("s3cret-pw", "[redacted]")
    expected = (
        f"error costs exited (code 2): trellis-costs: TRELLIS_DATABASE_URL={shown}:"
        " connection refused; stopping the rest"
    )
    assert expected in result.stderr.splitlines(), result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "SERVING" not in result.stdout
    assert not [p for p in range(base, base + PORT_BLOCK) if listening(p)]
