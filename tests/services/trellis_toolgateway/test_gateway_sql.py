"""sql_query against a real SQLite file: SELECTs answer, every kind of write is refused
before it runs and the database is byte-for-byte unchanged, runaway queries are stopped."""

import asyncio
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.tools.base import ToolError
from trellis_toolgateway.tools.sql import SqlQueryTool, _authorize


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, raw BLOB)")
        db.executemany(
            "INSERT INTO items (name, price, raw) VALUES (?, ?, ?)",
            [(f"item{i}", i * 1.5, bytes([i])) for i in range(1, 6)],
        )
    db.close()
    return path


@pytest.fixture
def sql(database: Path) -> SqlQueryTool:
    return SqlQueryTool(database, max_rows=3, statement_timeout=0.5)


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


async def test_select_returns_columns_and_rows(sql: SqlQueryTool) -> None:
    out = await sql.run(
        {"query": "SELECT id, name, price FROM items WHERE id <= ? ORDER BY id", "params": [2]}
    )
    assert out == {
        "columns": ["id", "name", "price"],
        "rows": [[1, "item1", 1.5], [2, "item2", 3.0]],
        "truncated": False,
    }
    cte = "WITH cheap AS (SELECT name FROM items WHERE price < 4) SELECT count(*) FROM cheap;"
    with_cte = await sql.run({"query": cte})
    assert with_cte["rows"] == [[2]]
    blob = await sql.run({"query": "SELECT raw FROM items WHERE id = 1 -- trailing comment"})
    assert blob["rows"] == [["AQ=="]]  # base64 of b"\x01"


async def test_rows_are_capped(sql: SqlQueryTool) -> None:
    out = await sql.run({"query": "SELECT id FROM items ORDER BY id"})
    assert out["rows"] == [[1], [2], [3]] and out["truncated"] is True


WRITES = [
    "INSERT INTO items (name) VALUES ('evil')",
    "UPDATE items SET price = 0",
    "DELETE FROM items",
    "REPLACE INTO items (id, name) VALUES (1, 'evil')",
    "DROP TABLE items",
    "CREATE TABLE evil (x)",
    "ALTER TABLE items ADD COLUMN evil TEXT",
    "CREATE INDEX evil ON items (name)",
    "ATTACH DATABASE '{attach}' AS evil",
    "PRAGMA user_version = 42",
    "PRAGMA writable_schema = ON",
    "PRAGMA query_only = OFF",
    "PRAGMA journal_mode = DELETE",
    "VACUUM",
    "BEGIN IMMEDIATE",
    "WITH x AS (SELECT 1) DELETE FROM items",
    "WITH x AS (SELECT 1) INSERT INTO items (name) SELECT 'evil' FROM x",
    "SELECT 1; DELETE FROM items",
    "SELECT 1; ATTACH DATABASE '{attach}' AS evil",
    "SELECT load_extension('/tmp/evil')",
]


@pytest.mark.parametrize("query", WRITES)
async def test_writes_are_refused_and_nothing_changes(
    query: str, sql: SqlQueryTool, database: Path, tmp_path: Path
) -> None:
    attach = tmp_path / "attached-sentinel.db"
    before = fingerprint(database)
    with pytest.raises((InvalidArgument, ToolError)) as raised:
        await sql.run({"query": query.replace("{attach}", str(attach))})
    error = raised.value
    if isinstance(error, InvalidArgument):
        assert error.reason == "SQL_NOT_ALLOWED"
        assert [v.field for v in error.violations] == ["args.query"]
    else:  # e.g. load_extension: not available at all
        assert error.code == "SQL_ERROR"
    assert fingerprint(database) == before
    assert not attach.exists()
    assert not (tmp_path / "shop.db-journal").exists()
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*), sum(price) FROM items").fetchone() == (5, 22.5)
    db.close()


async def test_incomplete_or_broken_sql(sql: SqlQueryTool) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await sql.run({"query": "SELECT * FROM items WHERE name = 'x"})
    assert raised.value.reason == "SQL_NOT_ALLOWED"
    for query, code in [("SELEC 1", "SQL_ERROR"), ("SELECT * FROM nothing", "SQL_ERROR")]:
        with pytest.raises(ToolError) as failed:
            await sql.run({"query": query})
        assert failed.value.code == code


async def test_runaway_query_is_stopped_at_the_statement_timeout(sql: SqlQueryTool) -> None:
    forever = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    )
    started = time.monotonic()
    with pytest.raises(ToolError) as raised:
        await sql.run({"query": forever})
    assert raised.value.code == "SQL_TIMEOUT"
    assert time.monotonic() - started < 2.0


async def test_cancelling_the_call_stops_the_query(database: Path) -> None:
    sql = SqlQueryTool(database, statement_timeout=30)
    forever = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    )
    task = asyncio.create_task(sql.run({"query": forever}))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The worker thread saw the cancellation: a new query gets a thread and answers fast.
    started = time.monotonic()
    assert (await sql.run({"query": "SELECT 1"}))["rows"] == [[1]]
    assert time.monotonic() - started < 1.0


async def test_without_a_database_the_tool_says_so(tmp_path: Path) -> None:
    with pytest.raises(ToolError) as raised:
        await SqlQueryTool(None).run({"query": "SELECT 1"})
    assert raised.value.code == "SQL_NOT_CONFIGURED"
    missing = SqlQueryTool(tmp_path / "nope.db")
    with pytest.raises(ToolError) as raised:
        await missing.run({"query": "SELECT 1"})
    assert raised.value.code == "SQL_UNAVAILABLE"
    assert "nope.db" not in os.listdir(tmp_path)  # mode=ro never creates the file


def test_the_authorizer_alone_stops_writes_on_a_writable_connection() -> None:
    """Each layer holds on its own: here the database is writable and query_only is off."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x)")
    db.set_authorizer(_authorize)
    assert db.execute("SELECT count(*) FROM t").fetchone() == (0,)
    for write in ("INSERT INTO t VALUES (1)", "DELETE FROM t", "PRAGMA user_version = 1"):
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            db.execute(write)
    db.set_authorizer(None)
    assert db.execute("SELECT count(*) FROM t").fetchone() == (0,)
    db.close()
