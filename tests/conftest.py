"""Shared fixtures: start real services on port 0 and give channels to them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from trellis.runtime.channels import Channels
from trellis.runtime.server import Builder, RunningServer, start_service
from trellis.runtime.settings import ServiceSettings
from trellis_offline_model.server import RunningModel, start_offline_model

Serve = Callable[[str, Builder, ServiceSettings], Awaitable[RunningServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(name, build, settings)`` starts a real gRPC server; stopped after the test."""
    running: list[RunningServer] = []

    async def _serve(name: str, builder: Builder, settings: ServiceSettings) -> RunningServer:
        server = await start_service(settings, name, builder)
        running.append(server)
        return server

    yield _serve
    for server in reversed(running):
        await server.stop(0)


@pytest.fixture
async def channels() -> AsyncIterator[Channels]:
    """Client channels for the test itself."""
    chans = Channels()
    yield chans
    await chans.close()


@pytest.fixture
async def model() -> AsyncIterator[RunningModel]:
    """The offline rules model on a free port (tests may script its replies)."""
    running = await start_offline_model(port=0)
    yield running
    await running.stop()
