"""``trellis-probe``, the image's health check, against a real server."""

from __future__ import annotations

import asyncio
import socket

import pytest

from trellis.runtime import probe
from trellis.runtime.server import Service
from trellis.runtime.settings import ServiceSettings


def _nothing() -> Service:
    return Service("p", [], lambda server: None)


async def _build(settings, telemetry, channels) -> Service:  # type: ignore[no-untyped-def]
    return _nothing()


async def test_probe_passes_for_a_serving_server_and_fails_otherwise(serve, monkeypatch) -> None:
    server = await serve("p", _build, ServiceSettings(port=0, metrics_port=0))
    # The probe is blocking (it runs as its own process in a container): off the loop.
    await asyncio.to_thread(probe.main, [server.target])
    monkeypatch.setenv("TRELLIS_PORT", server.target.rsplit(":", 1)[1])
    await asyncio.to_thread(probe.main, [])  # default target: 127.0.0.1:$TRELLIS_PORT

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{free.getsockname()[1]}"
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(probe.main, [dead])
    assert exited.value.code == 1

    monkeypatch.delenv("TRELLIS_PORT")
    with pytest.raises(SystemExit) as exited:
        probe.main([])
    assert exited.value.code == 2
