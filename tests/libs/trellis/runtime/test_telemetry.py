"""Health checks are not traced; every other RPC is."""

from types import SimpleNamespace

from trellis.runtime.telemetry import not_health_check


def test_health_checks_are_filtered_for_server_and_client_details() -> None:
    assert not not_health_check(SimpleNamespace(method="/grpc.health.v1.Health/Check"))
    assert not not_health_check(SimpleNamespace(method=b"/grpc.health.v1.Health/Watch"))
    assert not_health_check(SimpleNamespace(method="/trellis.cache.v1.CacheService/Get"))
    assert not_health_check(SimpleNamespace(method=b"/trellis.executor.v1.ExecutorService/Run"))
