"""``sql_query``: one read-only SELECT over a SQLite database.

Read-only is enforced three times, by SQLite itself rather than by inspecting text:
the database is opened with ``mode=ro`` (writes fail in the pager), ``PRAGMA
query_only`` is on (writes fail in the VM), and an authorizer admits only the actions a
SELECT needs (reads, selects, functions, recursive CTEs): INSERT, UPDATE, DELETE,
ATTACH, PRAGMA, CREATE, transactions, ... are denied while the statement is prepared,
before anything runs. Only one complete statement is accepted (``complete_statement``,
and ``execute`` refuses a second one). A progress handler enforces a statement timeout
and stops the query when the caller cancels; rows are capped (``truncated`` says so).
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path

from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis_toolgateway.tools.base import Json, Spec, Tool, ToolError

#: What a read-only query may do; everything else is denied while it is prepared.
_ALLOWED_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
#: VM instructions between two deadline checks (cheap; about every few ms).
_PROGRESS_STEPS = 10_000


def _authorize(action: int, *_: object) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def _cell(value: object) -> Json:
    """SQLite values as JSON: BLOBs become base64 strings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


class SqlQueryTool(Tool):
    """Runs one read-only query against ``database`` (None: not configured)."""

    def __init__(
        self,
        database: str | Path | None,
        *,
        name: str = "sql_query",
        max_rows: int = 1000,
        statement_timeout: float = 5.0,
    ) -> None:
        self._database = Path(database) if database is not None else None
        self._max_rows = max_rows
        self._statement_timeout = statement_timeout
        self.spec = Spec(
            name=name,
            description=(
                "Run one read-only SQL query (a single SELECT or WITH ... SELECT statement) "
                "against the configured SQLite database. Returns column names and rows "
                f"(at most {max_rows}; more are cut and marked truncated). Use ? placeholders "
                "with params for values."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "minLength": 1, "maxLength": 20_000},
                    "params": {
                        "type": "array",
                        "items": {"type": ["string", "number", "integer", "boolean", "null"]},
                        "maxItems": 100,
                    },
                },
                "required": ["query"],
                "additionalProperties": False,
            },
            output_schema={
                "type": "object",
                "properties": {
                    "columns": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": {"type": "array"}},
                    "truncated": {"type": "boolean"},
                },
                "required": ["columns", "rows", "truncated"],
                "additionalProperties": False,
            },
            cache_ttl=0.0,
            timeout=statement_timeout + 1.0,
        )

    def _rejected(self, message: str) -> InvalidArgument:
        return InvalidArgument(
            message,
            reason="SQL_NOT_ALLOWED",
            violations=[FieldViolation("args.query", message)],
            metadata={"tool": self.spec.name},
        )

    async def run(self, args: dict[str, Json]) -> Json:
        if self._database is None:
            raise ToolError("SQL_NOT_CONFIGURED", "no database: set sql_database in the tools file")
        query = str(args["query"]).strip()
        # complete_statement wants a final ";"; the newline first ends a trailing comment.
        if not sqlite3.complete_statement(query + "\n;"):
            raise self._rejected("the query must be one complete SQL statement")
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self._query, query, args.get("params", []), cancelled)
        finally:
            cancelled.set()  # a cancelled call stops the query at the next progress check

    def _query(self, query: str, params: list[Json], cancelled: threading.Event) -> Json:
        assert self._database is not None
        uri = f"file:{urllib.parse.quote(str(self._database))}?mode=ro"
        try:
            connection = sqlite3.connect(uri, uri=True, timeout=1.0, check_same_thread=False)
        except sqlite3.Error as error:
            raise ToolError("SQL_UNAVAILABLE", f"cannot open the database: {error}") from None
        deadline = time.monotonic() + self._statement_timeout
        try:
            connection.execute("PRAGMA query_only = ON")
            connection.set_authorizer(_authorize)
            connection.set_progress_handler(
                lambda: int(cancelled.is_set() or time.monotonic() > deadline), _PROGRESS_STEPS
            )
            cursor = connection.execute(query, params)
            rows = cursor.fetchmany(self._max_rows + 1)
            columns = [d[0] for d in cursor.description or ()]
        except sqlite3.ProgrammingError as error:  # two statements, wrong parameter count
            if "one statement" in str(error):
                raise self._rejected(f"only one statement is allowed ({error})") from None
            raise ToolError("SQL_ERROR", str(error)) from None
        except sqlite3.DatabaseError as error:
            raise self._failure(error, deadline) from None
        finally:
            connection.close()
        return {
            "columns": columns,
            "rows": [[_cell(v) for v in row] for row in rows[: self._max_rows]],
            "truncated": len(rows) > self._max_rows,
        }

    def _failure(self, error: sqlite3.DatabaseError, deadline: float) -> Exception:
        text = str(error)
        if "not authorized" in text or "readonly" in text or "query_only" in text:
            return self._rejected(f"only read-only SELECT statements are allowed ({text})")
        if "interrupted" in text:
            if time.monotonic() > deadline:
                return ToolError(
                    "SQL_TIMEOUT", f"the query ran longer than {self._statement_timeout:g}s"
                )
            return ToolError("SQL_CANCELLED", "the query was cancelled")
        return ToolError("SQL_ERROR", text)
