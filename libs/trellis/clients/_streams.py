"""Helper for server-streaming calls: domain errors out, the call cancelled on early exit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from grpc import aio

from trellis.runtime.errors import translated_rpc_errors

T = TypeVar("T")


async def stream(call: aio.UnaryStreamCall) -> AsyncIterator[T]:  # type: ignore[type-arg]
    """Iterate a server stream; if the consumer stops early the RPC is cancelled."""
    try:
        with translated_rpc_errors():
            async for message in call:
                yield message
    finally:
        call.cancel()
