"""Run state: the request, each planned node, each outcome as it completes.

``open_store`` picks the backend from ``TRELLIS_DATABASE_URL``: SQLite (the default,
one process or several sharing a file) or PostgreSQL (several executor replicas).
"""

from __future__ import annotations

from trellis.runtime.database import is_postgres, validate_database_url
from trellis_executor.store.base import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_OWNER,
    LeaseLost,
    Progress,
    Resumable,
    RunStore,
)
from trellis_executor.store.postgres import PostgresRunStore
from trellis_executor.store.sqlite import SqliteRunStore

__all__ = [
    "LeaseLost",
    "PostgresRunStore",
    "Progress",
    "Resumable",
    "RunStore",
    "SqliteRunStore",
    "open_store",
]


async def open_store(
    url: str, *, owner: str = DEFAULT_OWNER, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> RunStore:
    """Open (and create the schema of) the run store ``url`` names, for ``owner``."""
    if is_postgres(validate_database_url(url)):
        return await PostgresRunStore.open(url, owner=owner, lease_seconds=lease_seconds)
    return await SqliteRunStore.open(url, owner=owner, lease_seconds=lease_seconds)
