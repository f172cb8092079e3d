"""`trellis up`: five processes on the default ports, each with reflection and health."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from trellis.cli.up import MODEL, SERVICES

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
