"""Which database files can be used: the Spider layout's file per db_id, its health, and the SQLite files of a
test-suite folder.

A database file that exists but cannot be used (0 bytes, not SQLite, truncated, unreadable schema) is named once;
evaluate counts its questions wrong in EX (or leaves them out with --skip_missing_db). Files are picked by content
(the SQLite header), not by name: a `-wal`, `-journal` or notes file beside a database is never taken for one.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqltune.io import connect_read_only, database_path

SQLITE_HEADER = b"SQLite format 3\x00"


def is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == SQLITE_HEADER
    except OSError:
        return False


def database_files(db_path: str | Path) -> list[Path]:
    """Every SQLite database file in the folder of `db_path` (test-suite accuracy uses them all)."""
    folder = Path(db_path).parent
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(p for p in (folder / name for name in names) if p.is_file() and is_sqlite_file(p))


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


def check_databases(db_dir: str, db_ids: set[str]) -> tuple[set[str], dict[str, str], list[str]]:
    """(absent db_ids, {unreadable db_id: why}, notices about -wal files whose changes are not read)."""
    absent, unreadable, notices = set(), {}, []
    for db_id in sorted(db_ids):
        path = database_path(db_dir, db_id)
        if not path.is_file():
            absent.add(db_id)
            continue
        problem = database_problem(path)
        if problem:
            unreadable[db_id] = problem
        wal = path.with_name(path.name + "-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            notices.append(f"warning: database {db_id}: {wal} holds changes that are not read (databases are opened "
                           "immutable, so nothing is written beside them; checkpoint it to include them)")
    return absent, unreadable, notices


