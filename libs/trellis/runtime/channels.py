"""The channel factory: one cached grpc.aio channel per target.

Every channel gets the same service config (round_robin over all resolved addresses,
transparent retries of UNAVAILABLE only), keepalive, a reconnect back-off capped at 2 s,
their own connections (no subchannels shared between channels), message limits and the client
interceptors (deadline and tenant propagation, and with a tracer the calls' spans:
``trellis.runtime.client_interceptors``). Services ask for a channel
by target and never build one themselves. With ``credentials`` (mTLS, see
``trellis.runtime.tls``) every channel is a TLS channel with them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc
from grpc import aio
from opentelemetry import trace

from trellis.runtime.client_interceptors import client_interceptors

RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    # Only UNAVAILABLE: the request never reached a handler, so a retry is safe.
    "retryableStatusCodes": ["UNAVAILABLE"],
}

#: The longest wait between attempts to reconnect to a dead target (gRPC's default: 120 s).
MAX_RECONNECT_BACKOFF_MS = 2_000

#: How every channel, the project's own short-lived ones too, (re)connects.
CONNECTION_OPTIONS: tuple[tuple[str, object], ...] = (
    # gRPC's default grows the wait between reconnects to 120 s: a dependency that was
    # down for a minute would stay "down" to its callers long after it is back.
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    # Each channel owns its connections: a fresh channel never inherits the reconnect
    # back-off of another channel (in this process) to an address that was dead.
    ("grpc.use_local_subchannel_pool", 1),
)

SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}],
    }
)


def channel_options(max_message_bytes: int) -> list[tuple[str, object]]:
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        *CONNECTION_OPTIONS,
    ]


class Channels:
    """Cached channels for one service (or one embedded stack); close them at shutdown."""

    def __init__(
        self,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        interceptors: Sequence[aio.ClientInterceptor] = (),
        credentials: grpc.ChannelCredentials | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._options = channel_options(max_message_bytes)
        self._credentials = credentials
        self._interceptors = [*interceptors, *client_interceptors(tracer)]
        self._channels: dict[str, aio.Channel] = {}

    def get(self, target: str) -> aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            if self._credentials is None:
                channel = aio.insecure_channel(
                    target, options=self._options, interceptors=self._interceptors
                )
            else:
                channel = aio.secure_channel(
                    target,
                    self._credentials,
                    options=self._options,
                    interceptors=self._interceptors,
                )
            self._channels[target] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
