"""The shared service runtime: one home for each cross-cutting concern.

- ``settings``     typed configuration from the environment, fail fast on bad values
- ``errors``       domain exceptions <-> gRPC status with google.rpc details
- ``context``      request-scoped deadline and tenant, propagated to onward calls
- ``interceptors`` server/client interceptors that apply ``errors`` and ``context``
- ``channels``     one cached channel per target with retry policy and interceptors
- ``server``       grpc.aio server bootstrap: health, reflection, limits, graceful stop
- ``telemetry``    OpenTelemetry tracing from OTEL_* variables, JSON logs
- ``metrics``      Prometheus metric definitions and the /metrics endpoint
- ``convert``      protobuf <-> Python value helpers
"""
