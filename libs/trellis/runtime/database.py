"""Which database a ``TRELLIS_DATABASE_URL`` names, checked once at start-up.

Settings validators call these so a URL the service cannot open stops it with a
one-line message instead of failing on the first write. The run store (executor) and
the ledger (cost accounting) both speak SQLite and PostgreSQL.
"""

from __future__ import annotations

from trellis.runtime.sqlite import SQLITE_PREFIX

POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def is_postgres(url: str) -> bool:
    return url.startswith(POSTGRES_PREFIXES)


def validate_database_url(url: str) -> str:
    """For settings validators of services with a PostgreSQL backend (run store, ledger)."""
    if not (url.startswith(SQLITE_PREFIX) or is_postgres(url)):
        raise ValueError(
            "database URL must be sqlite:///path or postgresql://user@host[:port]/dbname"
        )
    return url
