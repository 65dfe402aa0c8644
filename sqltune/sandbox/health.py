"""Whether a database file can be run against at all: its header, the size it promises, its schema table.

Every stage that runs SQL checks files with this first, so a broken file is named once (not once per question).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqltune.io import connect_read_only

SQLITE_HEADER = b"SQLite format 3\x00"


def is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == SQLITE_HEADER
    except OSError:
        return False


def database_problem(path: Path) -> str | None:
    """Why a database file cannot be used (None when it can): empty, not SQLite, truncated, unreadable schema.
    Cheap: the header, the size it promises, and one read of the schema table."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if size == 0:
        return "empty file (0 bytes)"
    if header[:16] != SQLITE_HEADER:
        return "not a SQLite database"
    if len(header) < 100:
        return f"truncated ({size} bytes)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if pages and header[24:28] == header[92:96] and size < pages * page_size:  # the page count is valid
        return f"truncated ({size} bytes of {pages * page_size})"
    try:
        conn = connect_read_only(path)
        try:
            conn.execute("SELECT name FROM sqlite_master").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"unreadable ({exc})"
    return None
