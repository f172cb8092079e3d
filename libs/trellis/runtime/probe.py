"""``trellis-probe [host:port]``: exit 0 when the gRPC server there reports SERVING.

The container health check of the image (Docker has no native gRPC probe; Kubernetes
does and uses that instead). The default target is this container's own server,
``127.0.0.1:$TRELLIS_PORT``, over mTLS when the service's TRELLIS_TLS_* files are set
(its certificate must then name 127.0.0.1). It asks the overall server status (service ""), which a
Trellis server turns NOT_SERVING as soon as it begins a graceful stop.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.runtime import tls

TIMEOUT_SECONDS = 2.0


def _channel(target: str) -> grpc.Channel:
    """Over mTLS with this container's certificate when TRELLIS_TLS_* are set."""
    files = tls.from_env()
    if files is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, files.channel_credentials())


def check(target: str, timeout: float = TIMEOUT_SECONDS) -> str:
    """The health status name reported by ``target`` (e.g. ``SERVING``)."""
    with _channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    port = os.environ.get("TRELLIS_PORT", "")
    target = args[0] if args else f"127.0.0.1:{port}"
    if not args and not port:
        print("trellis-probe: give host:port or set TRELLIS_PORT", file=sys.stderr)
        raise SystemExit(2)
    try:
        status = check(target)
    except grpc.RpcError as error:
        print(f"trellis-probe: {target}: {error.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
        raise SystemExit(1) from None
    if status != "SERVING":
        print(f"trellis-probe: {target}: {status}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
