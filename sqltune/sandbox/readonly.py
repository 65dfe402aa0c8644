"""A read-only SQLite connection for model-written SQL, and one query run on it with bounds on rows and size.

- the file is opened with the SQLite URI `mode=ro&immutable=1`, so no statement can write it and nothing is
  created beside it (no -wal/-shm files, even for a WAL-mode database); temporary tables and sort spills stay in
  memory (`temp_store = MEMORY`), bounded by SQLite's heap limit, so an ORDER BY never writes a temp file;
- an authorizer allows only reading (SELECT, reading columns, functions other than load_extension, recursive
  CTEs): DROP, DELETE, UPDATE, INSERT, CREATE, ATTACH, PRAGMA and VACUUM are refused before they run;
- a progress handler interrupts a query after `timeout` seconds. It runs only between SQLite's steps (a LIKE over
  a long string is one step), so it is the polite stop; the hard one is the sandbox's worker being killed;
- at most `max_rows` rows are fetched, and every cell is counted against `max_bytes` (a fixed cost per cell and
  per row, as Python holds them, plus the length of text and blobs), row by row; no single value may be longer
  than `max_bytes` (SQLite's length limit).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlparse import tokens as T

from sqltune.io import connect_read_only
from sqltune.sqltext import first_statement_tokens

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
            getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER", "VACUUM", "REINDEX", "ANALYZE")
MB = 1 << 20
CELL_BYTES = 32  # what Python spends on one value in a row (pointer + object), text and blob bytes come on top
ROW_BYTES = 64  # a row's tuple and its place in the list


class QueryError(Exception):
    """A query failed, was refused, ran out of time or returned too much."""


def _authorize(action, arg1, arg2, db_name, source):
    if action not in _ALLOWED:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def connect(path: str | Path, max_bytes: int = 64 * MB) -> sqlite3.Connection:
    """A read-only connection that only lets SELECT statements through, with no value longer than max_bytes."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"database file not found: {path}")
    try:
        conn = connect_read_only(path)  # as the official, undecodable text bytes are dropped
        conn.execute("PRAGMA temp_store = MEMORY")  # before the authorizer, which refuses every PRAGMA
    except sqlite3.Error as exc:
        raise QueryError(f"database unreadable: {exc}") from None
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_bytes)
    conn.set_authorizer(_authorize)
    return conn


def cap_heap(conn: sqlite3.Connection, soft: int, hard: int) -> None:
    """SQLite's heap limits, per process (the sandbox's workers set them once; over the hard one a query fails
    with 'out of memory' instead of growing)."""
    conn.set_authorizer(None)
    try:
        conn.execute(f"PRAGMA soft_heap_limit = {int(soft)}")
        conn.execute(f"PRAGMA hard_heap_limit = {int(hard)}")
    finally:
        conn.set_authorizer(_authorize)


def refusal(sql: str) -> str:
    """Why the authorizer refused `sql` (read from its keywords; only on this error path)."""
    words = [value.upper() for ttype, value in first_statement_tokens(sql) or [] if ttype in T.Keyword]
    verb = words[0] if words else ""
    if verb == "WITH":  # a CTE: the statement's verb comes after the WITH clauses
        verb = next((w for w in words if w in _WRITES), "SELECT")
    if verb in _WRITES:
        return f"write refused: databases are read-only ({verb})"
    if verb == "SELECT":
        return f"refused: a function that is not allowed ({', '.join(sorted(_DENIED_FUNCTIONS))})"
    return "refused: only SELECT statements run" + (f" ({verb})" if verb else "")


def result_size(rows: list[tuple]) -> int:
    """The bytes `rows` count against a result bound (the same rule run_query applies row by row)."""
    size = 0
    for row in rows:
        size += ROW_BYTES + CELL_BYTES * len(row)
        for value in row:
            if value.__class__ is str or value.__class__ is bytes:
                size += len(value)
    return size


def run_query(conn: sqlite3.Connection, sql: str, timeout: float, max_rows: int, max_bytes: int = 64 * MB
              ) -> list[tuple]:
    """All rows of `sql`, or QueryError (more than max_rows is one). The connection stays usable afterwards."""
    return _fetch(conn, sql, timeout, max_rows, max_bytes, cut=False)[1]


def first_rows(conn: sqlite3.Connection, sql: str, timeout: float, n: int, max_bytes: int = 64 * MB
               ) -> tuple[list[str], list[tuple], bool]:
    """(column names, the first n rows, whether more followed) of `sql`, or QueryError: for showing a result,
    where a long one is cut rather than failed."""
    columns, rows = _fetch(conn, sql, timeout, n, max_bytes, cut=True)
    return columns, rows[:n], len(rows) > n


def _fetch(conn: sqlite3.Connection, sql: str, timeout: float, max_rows: int, max_bytes: int, cut: bool
           ) -> tuple[list[str], list[tuple]]:
    """(column names, rows); past max_rows: one row more and stop (`cut`), else QueryError."""
    deadline = time.monotonic() + timeout
    timed_out = False

    def check() -> int:
        nonlocal timed_out
        if time.monotonic() > deadline:
            timed_out = True
            return 1
        return 0

    conn.set_progress_handler(check, 10_000)
    try:
        cursor = conn.execute(sql)
        columns = [d[0] for d in cursor.description or ()]
        rows: list[tuple] = []
        size = 0
        for row in cursor:  # row by row: a result over the byte bound stops at the row that crosses it
            size += ROW_BYTES + CELL_BYTES * len(row)
            for value in row:
                if value.__class__ is str or value.__class__ is bytes:
                    size += len(value)
            if size > max_bytes:
                raise QueryError(f"result too large: more than {max_bytes / MB:g} MB")
            rows.append(row)
            if len(rows) > max_rows:
                if cut:
                    cursor.close()  # the statement ends here, not when the cursor is collected
                    break
                raise QueryError(f"more than {max_rows} rows")
        return columns, rows
    except sqlite3.Error as exc:
        if timed_out:
            raise QueryError(f"timed out after {timeout:g} s") from None
        text = str(exc)
        if "not authorized" in text:
            raise QueryError(refusal(sql)) from None
        if "string or blob too big" in text:
            raise QueryError(f"result too large: a value over {max_bytes / MB:g} MB") from None
        if "out of memory" in text:
            raise QueryError("result too large: the memory bound was reached") from None
        raise QueryError(f"{type(exc).__name__}: {exc}") from None
    except MemoryError:
        raise QueryError("result too large: the memory bound was reached") from None
    except (sqlite3.Warning, ValueError, OverflowError) as exc:  # e.g. two statements, huge ints
        raise QueryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.set_progress_handler(None, 0)
