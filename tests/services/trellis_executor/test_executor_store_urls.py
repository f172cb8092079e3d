"""Which database URLs the executor accepts (PostgreSQL too) and which it refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trellis.runtime.database import is_postgres, validate_database_url
from trellis_executor.settings import ExecutorSettings


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///.trellis/trellis.db",
        "sqlite:///:memory:",
        "postgresql://postgres@127.0.0.1:5432/trellis",
        "postgres://user:pw@db/trellis",
    ],
)
def test_executor_accepts_sqlite_and_postgres(url: str) -> None:
    assert ExecutorSettings(database_url=url).database_url == url


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://relative.db", "postgresql:/x", ""])
def test_other_urls_are_refused_with_one_line(url: str) -> None:
    with pytest.raises(ValidationError) as raised:
        ExecutorSettings(database_url=url)
    message = raised.value.errors()[0]["msg"]
    assert "sqlite:///path or postgresql://" in message and "\n" not in message
    with pytest.raises(ValueError):
        validate_database_url(url)


def test_is_postgres() -> None:
    assert is_postgres("postgres://h/d") and is_postgres("postgresql://h/d")
    assert not is_postgres("sqlite:///x.db")
