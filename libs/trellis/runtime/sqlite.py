"""SQLite, the embedded default for stateful services (ledger, run store).

``TRELLIS_DATABASE_URL`` picks the store: ``sqlite:///relative/path.db``,
``sqlite:////absolute/path.db`` or ``sqlite:///:memory:`` (the run store and the ledger
also take ``postgresql://``, see ``trellis.runtime.database``). The connection uses WAL
and a busy timeout so several processes (``trellis up``) can share one file.
"""

from __future__ import annotations

from pathlib import Path

import aiosqlite

SQLITE_PREFIX = "sqlite:///"
DEFAULT_DATABASE_URL = "sqlite:///.trellis/trellis.db"


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///`` URL (``:memory:`` when empty)."""
    if not url.startswith(SQLITE_PREFIX):
        raise ValueError(f"not a SQLite URL (sqlite:///path): {url!r}")
    return url[len(SQLITE_PREFIX) :] or ":memory:"


async def connect(url: str, *, autocommit: bool = False) -> aiosqlite.Connection:
    """Open the database at ``url``, creating its directory, in WAL mode.

    ``autocommit``: each statement commits itself, one thread hop per write instead of
    two (execute, then commit), for stores whose every write is a single statement.
    """
    path = sqlite_path(url)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    options = {"isolation_level": None} if autocommit else {}
    db = await aiosqlite.connect(path, **options)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA busy_timeout=5000")
    await db.execute("PRAGMA synchronous=NORMAL")
    return db
