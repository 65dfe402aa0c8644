"""Running model-written SQL without risk: read-only connections, an allow-list authorizer, and bounds on every
query's time, rows and memory.

- the file is opened with the SQLite URI `mode=ro&immutable=1`, so no statement can write it and nothing is
  created beside it (no -wal/-shm files, even for a WAL-mode database);
- an authorizer allows only reading (SELECT, reading columns, functions other than load_extension, recursive
  CTEs): DROP, DELETE, UPDATE, INSERT, CREATE, ATTACH, PRAGMA and VACUUM are refused before they run;
- a progress handler interrupts a query after `timeout` seconds (a runaway cross join stops and counts wrong);
- at most `max_rows` rows are fetched, and at most `max_bytes` of text and blob values (counted row by row); no
  single value may be longer than `max_bytes` (SQLite's length limit); SQLite's own heap is capped for the process
  (soft and hard heap limits), so a query such as `SELECT randomblob(1e9)` or a row of many huge values fails as
  "result too large" instead of taking the machine's memory.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlparse import tokens as T

from sqltune.eval.values import first_statement_tokens
from sqltune.io import connect_read_only

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
            getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER", "VACUUM", "REINDEX", "ANALYZE")
MB = 1 << 20
_heap_capped = False


class QueryError(Exception):
    """A query failed, was refused, ran out of time or returned too much."""


def _authorize(action, arg1, arg2, db_name, source):
    if action not in _ALLOWED:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _cap_heap(conn: sqlite3.Connection, max_bytes: int) -> None:
    """SQLite's heap limits are per process: set once (the hard one can only be lowered later)."""
    global _heap_capped
    if not _heap_capped:
        conn.execute(f"PRAGMA soft_heap_limit = {64 * MB + max_bytes}")
        conn.execute(f"PRAGMA hard_heap_limit = {256 * MB + 2 * max_bytes}")
        _heap_capped = True


def connect(path: str | Path, max_bytes: int = 64 * MB) -> sqlite3.Connection:
    """A read-only connection that only lets SELECT statements through, with no value longer than max_bytes."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"database file not found: {path}")
    conn = connect_read_only(path)  # as the official, undecodable text bytes are dropped
    _cap_heap(conn, max_bytes)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_bytes)
    conn.set_authorizer(_authorize)
    return conn


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


def run_query(conn: sqlite3.Connection, sql: str, timeout: float, max_rows: int, max_bytes: int = 64 * MB
              ) -> list[tuple]:
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
        size = 0
        for row in cursor:  # row by row: a result over the byte bound stops at the row that crosses it
            for value in row:
                if value.__class__ is str or value.__class__ is bytes:
                    size += len(value)
            if size > max_bytes:
                raise QueryError(f"result too large: more than {max_bytes / MB:g} MB")
            rows.append(row)
            if len(rows) > max_rows:
                raise QueryError(f"more than {max_rows} rows")
        return rows
    except sqlite3.Error as exc:
        if timed_out:
            raise QueryError(f"timed out after {timeout:g} s") from None
        text = str(exc)
        if "not authorized" in text:
            raise QueryError(refusal(sql)) from None
        if "string or blob too big" in text:
            raise QueryError(f"result too large: a value over {max_bytes / MB:g} MB") from None
        raise QueryError(f"{type(exc).__name__}: {exc}") from None
    except MemoryError:
        raise QueryError("result too large: SQLite's memory bound reached") from None
    except (sqlite3.Warning, ValueError, OverflowError) as exc:  # e.g. two statements, huge ints
        raise QueryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.set_progress_handler(None, 0)
