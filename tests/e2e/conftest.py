"""The embedded stack (five services on port 0, offline model) for end-to-end tests."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from trellis.clients.executor import ExecutorClient
from trellis_cli.stack import Stack, start_stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = await start_stack(database_url=f"sqlite:///{tmp_path}/trellis.db")
    yield running
    await running.stop()


@pytest.fixture
def executor(stack: Stack, channels) -> ExecutorClient:
    return ExecutorClient(channels.get(stack.executor_target))
