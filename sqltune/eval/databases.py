"""Which database files can be used: the Spider layout's file per db_id, its health, and the SQLite files of a
test-suite folder.

A database file that exists but cannot be used (0 bytes, not SQLite, truncated, unreadable schema) is named once;
evaluate counts its questions wrong in EX (or leaves them out with --skip_missing_db). Files are picked by content
(the SQLite header), not by name: a `-wal`, `-journal` or notes file beside a database is never taken for one.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqltune.io import database_path
from sqltune.sandbox import database_problem, is_sqlite_file

def database_files(db_path: str | Path) -> list[Path]:
    """Every SQLite database file in the folder of `db_path` (test-suite accuracy uses them all)."""
    folder = Path(db_path).parent
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(p for p in (folder / name for name in names) if p.is_file() and is_sqlite_file(p))


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


