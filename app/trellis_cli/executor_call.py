"""What every command calling the executor shares: its options and its client.

``--target`` (``TRELLIS_EXECUTOR_TARGET``), ``--api-key`` (``TRELLIS_API_KEY``; with auth
on, the key's tenant is the caller) and ``--tenant`` (``TRELLIS_TENANT``, for an executor
with auth off) mean the same in ``run``, ``runs ...`` and ``tools``; ``executor`` opens
the channel (mTLS from ``TRELLIS_TLS_*``) for one command and closes it after; ``call``
makes one request with it and reports its error as every command does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

import typer

from trellis.clients.executor import ExecutorClient
from trellis.runtime import context
from trellis_cli import exits
from trellis_cli.runs import client_channels

T = TypeVar("T")

DEFAULT_TARGET = "localhost:50051"
TARGET_OPTION = "--target/TRELLIS_EXECUTOR_TARGET"

Target = Annotated[
    str,
    typer.Option(envvar="TRELLIS_EXECUTOR_TARGET", help="gRPC target (host:port) of the executor."),
]
ApiKey = Annotated[
    str,
    typer.Option(
        envvar="TRELLIS_API_KEY",
        help="API key (executor with auth on; its tenant replaces --tenant).",
        show_default=False,
    ),
]
Tenant = Annotated[
    str, typer.Option(envvar="TRELLIS_TENANT", help="Tenant, for an executor with auth off.")
]
Json = Annotated[bool, typer.Option("--json", help="proto3 JSON, one message per line.")]


def where(target: str) -> exits.Target:
    """The executor at ``target``, for error messages."""
    return exits.Target("executor", target, TARGET_OPTION)


@asynccontextmanager
async def executor(
    target: str,
    api_key: str,
    tenant: str,
    timeout: float,  # noqa: ASYNC109 - the calls' deadline, not a wait of this function
) -> AsyncIterator[ExecutorClient]:
    """A client of the executor at ``target`` whose calls act as ``tenant`` (or as the
    key's) and end within ``timeout`` seconds; its channel is closed on the way out."""
    channels = client_channels()
    try:
        with context.request_scope(timeout=timeout, tenant_id=tenant):
            yield ExecutorClient(channels.get(target), timeout=timeout, api_key=api_key or None)
    finally:
        await channels.close()


def call(
    target: str,
    api_key: str,
    tenant: str,
    timeout: float,
    use: Callable[[ExecutorClient], Awaitable[T]],
) -> T:
    """``use(client)`` against the executor at ``target``; an error is one line and the
    exit code of its kind (``exits.reported``)."""

    async def main() -> T:
        async with executor(target, api_key, tenant, timeout) as client:
            return await use(client)

    with exits.reported(where(target)):
        return asyncio.run(main())
