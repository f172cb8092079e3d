"""The resource and trace ids of a service's tracing, as the standard OTEL_* variables
say: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the service's own name,
and with OTEL_SDK_DISABLED there is no trace id rather than 32 zeros."""

from __future__ import annotations

import pytest

from trellis.runtime.telemetry import setup_telemetry, span_id_of, trace_id_of

_ENV = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


def _resource(service: str) -> dict:
    telemetry = setup_telemetry(service)
    try:
        return dict(telemetry.tracer_provider.resource.attributes)
    finally:
        telemetry.shutdown()


def test_the_service_name_is_the_services_own_by_default() -> None:
    assert _resource("planner")["service.name"] == "planner"


def test_otel_service_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trellis-planner-eu")
    assert _resource("planner")["service.name"] == "trellis-planner-eu"


def test_otel_resource_attributes_are_kept_and_may_name_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,team=agents")
    attributes = _resource("executor")
    assert attributes["deployment.environment"] == "staging"
    assert attributes["team"] == "agents"
    assert attributes["service.name"] == "executor"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    assert _resource("executor")["service.name"] == "from-attributes"


def test_trace_ids_are_hex_when_tracing_is_on() -> None:
    telemetry = setup_telemetry("executor")
    span = telemetry.tracer.start_span("trellis.run")
    span.end()
    telemetry.shutdown()
    assert len(trace_id_of(span)) == 32 and int(trace_id_of(span), 16)
    assert len(span_id_of(span)) == 16 and int(span_id_of(span), 16)


def test_trace_ids_are_empty_with_the_sdk_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    telemetry = setup_telemetry("executor")
    span = telemetry.tracer.start_span("trellis.run")
    span.end()
    telemetry.shutdown()
    assert span.get_span_context().trace_id == 0  # what "32 zeros" came from
    assert (trace_id_of(span), span_id_of(span)) == ("", "")
