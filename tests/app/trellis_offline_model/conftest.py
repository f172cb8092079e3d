"""A real offline model server on port 0 and a real openai client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI

from trellis_offline_model.server import RunningModel


@pytest.fixture
async def client(model: RunningModel) -> AsyncIterator[AsyncOpenAI]:
    openai_client = AsyncOpenAI(base_url=model.base_url, api_key="unused", max_retries=0)
    yield openai_client
    await openai_client.close()
