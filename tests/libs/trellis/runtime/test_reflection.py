"""The reflection pool finds the file of a method symbol too (grpcurl describe
<Service>.<Method>, grpc/grpc#34743); tests/e2e/test_grpcurl.py drives the real grpcurl."""

import pytest
from grpc_health.v1 import health_pb2

from trellis.executor.v1 import executor_pb2
from trellis.runtime.reflection import MethodSymbolPool

EXECUTOR = executor_pb2.DESCRIPTOR.name  # trellis/executor/v1/executor.proto


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("trellis.executor.v1.ExecutorService.Run", EXECUTOR),
        ("trellis.executor.v1.ExecutorService.GetRun", EXECUTOR),
        ("grpc.health.v1.Health.Check", health_pb2.DESCRIPTOR.name),
        ("trellis.executor.v1.ExecutorService", EXECUTOR),  # what worked before still does
        ("trellis.executor.v1.RunRequest", EXECUTOR),
        ("trellis.executor.v1.RunRequest.goal", EXECUTOR),
        ("google.protobuf.Struct", "google/protobuf/struct.proto"),
    ],
)
def test_symbols_resolve_to_their_file(symbol: str, file: str) -> None:
    assert MethodSymbolPool().FindFileContainingSymbol(symbol).name == file


@pytest.mark.parametrize(
    "symbol",
    [
        "trellis.executor.v1.ExecutorService.NoSuchMethod",
        "trellis.executor.v1.NoSuchService.Run",
        "Run",
        "",
    ],
)
def test_unknown_symbols_are_still_key_errors(symbol: str) -> None:
    with pytest.raises(KeyError):
        MethodSymbolPool().FindFileContainingSymbol(symbol)


def test_the_other_lookups_are_the_default_pools() -> None:
    pool = MethodSymbolPool()
    assert pool.FindFileByName(EXECUTOR) is executor_pb2.DESCRIPTOR
    request = pool.FindMessageTypeByName("trellis.executor.v1.RunRequest")
    assert request is executor_pb2.RunRequest.DESCRIPTOR
    assert pool.FindAllExtensions(request) == []
    with pytest.raises(KeyError):
        pool.FindExtensionByNumber(request, 1000)
