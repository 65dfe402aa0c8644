"""Running model-written SQL without risk: read-only connections, an allow-list authorizer, a time bound and a
row bound on every query.

- the file is opened with the SQLite URI `mode=ro`, so no statement can write it;
- an authorizer allows only reading (SELECT, reading columns, functions other than load_extension, recursive
  CTEs): DROP, DELETE, UPDATE, INSERT, CREATE, ATTACH, PRAGMA and VACUUM are refused before they run, so no
  prediction can change a database or create a file;
- a progress handler interrupts a query after `timeout` seconds (a runaway cross join stops and counts wrong);
- at most `max_rows` rows are fetched; more is an error.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqltune.io import connect_read_only

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
            getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


class QueryError(Exception):
    """A query failed, was refused, ran out of time or returned too many rows."""


def _authorize(action, arg1, arg2, db_name, source):
    if action not in _ALLOWED:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def connect(path: str | Path) -> sqlite3.Connection:
    """A read-only connection that only lets SELECT statements through."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"database file not found: {path}")
    conn = connect_read_only(path)  # as the official, undecodable text bytes are dropped
    conn.set_authorizer(_authorize)
    return conn


def run_query(conn: sqlite3.Connection, sql: str, timeout: float, max_rows: int) -> list[tuple]:
    """All rows of `sql`, or QueryError. The connection stays usable afterwards."""
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
        rows: list[tuple] = []
        while True:
            chunk = cursor.fetchmany(1000)
            if not chunk:
                break
            rows.extend(chunk)
            if len(rows) > max_rows:
                raise QueryError(f"more than {max_rows} rows")
        return rows
    except sqlite3.Error as exc:
        if timed_out:
            raise QueryError(f"timed out after {timeout:g} s") from None
        raise QueryError(f"{type(exc).__name__}: {exc}") from None
    except (sqlite3.Warning, ValueError, OverflowError, MemoryError) as exc:  # e.g. two statements, huge ints
        raise QueryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.set_progress_handler(None, 0)
