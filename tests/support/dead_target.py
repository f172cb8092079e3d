"""A gRPC target nobody listens on, for tests of a service whose peer is down."""

from __future__ import annotations

import socket


def dead_target() -> str:
    """A local port nobody listens on (bound, read and released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"
