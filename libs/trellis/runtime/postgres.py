"""asyncpg pools that ride through a PostgreSQL restart: the run store's and the ledger's.

asyncpg's pool replaces a connection it already knows is closed, but a statement on a
connection the server cuts while it runs (restart, fail-over, an administrator's
``pg_terminate_backend``) fails, and so does every connect while the server is down or
still starting. ``ReconnectingPool`` runs each statement - or a block of statements on
one connection - again after such a *connection* error, with backoff, for up to
``within`` seconds (a restart takes from a fraction of a second to a fail-over's tens),
then raises ``Unavailable`` with the store's reason (``RUN_STORE_UNAVAILABLE``,
``LEDGER_UNAVAILABLE``): a clear, retryable error for the caller instead of a bare
socket error. SQL errors (constraint violations, syntax, a statement timeout) are
never retried.

Only idempotent work may be retried blindly: reads, ``UPDATE ... SET``, upserts. An
INSERT may have committed before its connection dropped: its caller passes
``on_retry`` to ``run`` to learn that a unique violation may then be its own row.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from trellis.runtime.errors import Unavailable
from trellis.runtime.logs import get_logger
from trellis.runtime.redact import redact_url
from trellis.runtime.settings import StartupError

log = get_logger(__name__)

T = TypeVar("T")

#: Errors saying the connection (not the statement) failed: worth another connection.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # 08xxx, incl. "connection was closed in the middle"
    asyncpg.AdminShutdownError,  # 57P01 terminating connection due to administrator command
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.CannotConnectNowError,  # 57P03 the database system is starting up/shutting down
    OSError,  # connection refused/reset while the server is down
    TimeoutError,  # a connect that did not complete
)

DEFAULT_WITHIN = 10.0
BACKOFF = (0.05, 1.0)


class ReconnectingPool:
    """The parts of an ``asyncpg.Pool`` the stores use, each retried on connection errors;
    ``Unavailable(reason)`` naming ``what`` when the database stays unreachable."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        what: str,
        reason: str,
        within: float = DEFAULT_WITHIN,
    ) -> None:
        self.pool = pool
        self._what = what
        self._reason = reason
        self._within = within

    async def run(
        self,
        block: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """``block(connection)`` on a pooled connection, again on a fresh one after a
        connection error (``on_retry`` is told before each new try)."""
        give_up = time.monotonic() + self._within
        delay, cap = BACKOFF
        while True:
            try:
                async with self.pool.acquire() as connection:
                    return await block(connection)
            except CONNECTION_ERRORS as error:
                pause = random.uniform(delay / 2, delay)
                if time.monotonic() + pause > give_up:
                    raise Unavailable(
                        f"the {self._what} database is unreachable "
                        f"({type(error).__name__}: {error})",
                        reason=self._reason,
                    ) from error
                log.warning(
                    "database connection failed; trying again",
                    error=f"{type(error).__name__}: {error}",
                    retry_in_s=round(pause, 3),
                )
                await asyncio.sleep(pause)
                delay = min(delay * 2, cap)
                if on_retry is not None:
                    on_retry()

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.run(lambda c: c.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.run(lambda c: c.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.run(lambda c: c.fetchrow(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.run(lambda c: c.fetchval(sql, *args))

    def acquire(self) -> Any:
        """A pooled connection, not retried (for work that handles errors itself)."""
        return self.pool.acquire()

    async def close(self) -> None:
        await self.pool.close()


async def open_pool(
    url: str,
    schema: str,
    *,
    schema_lock: int,
    min_size: int = 1,
    max_size: int = 10,
    setting: str = "TRELLIS_DATABASE_URL",
) -> asyncpg.Pool:
    """A pool to ``url`` with ``schema`` applied, under a transaction-scoped advisory lock
    (``schema_lock``) so replicas starting together do not race on CREATE IF NOT EXISTS.

    A URL that cannot be used (refused connection, unknown host, no such database or
    role, wrong password, no right to create the schema) is a ``StartupError`` naming
    ``setting`` and the URL without its password: the service stops with one line.
    """
    try:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as error:
        raise StartupError(f"{setting}={redact_url(url)}: {_why(error)}") from error
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", schema_lock)
            await conn.execute(schema)
    except asyncpg.PostgresError as error:
        await pool.close()
        raise StartupError(
            f"{setting}={redact_url(url)}: cannot create the tables ({_why(error)})"
        ) from error
    except BaseException:
        await pool.close()
        raise
    return pool


def _why(error: BaseException) -> str:
    """What went wrong connecting, in words (asyncpg's own message for server errors)."""
    if isinstance(error, ConnectionRefusedError) or getattr(error, "errno", None) == (
        errno.ECONNREFUSED
    ):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror})"
    if isinstance(error, TimeoutError):
        return "connection timed out"
    if isinstance(error, OSError) and "Connect call failed" in str(error):
        return "connection refused"  # asyncpg tried several addresses (localhost)
    return " ".join(str(error).split()) or type(error).__name__
