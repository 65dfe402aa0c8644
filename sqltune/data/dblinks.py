"""A folder in the Spider layout, `<folder>/<db_id>/<db_id>.sqlite`, made of symbolic links to databases that lie
elsewhere (`prepare --source sqlite` with `<dir>/<db_id>.sqlite` files).

Why links: every later stage (evaluate, predict's vote, run) finds a database as `<db_dir>/<db_id>/<db_id>.sqlite`
(sqltune.io.database_path), so one folder in that layout makes them all work unchanged, with no copy of what may
be gigabytes. The links are only ever read through: every stage opens databases read-only and immutable, and no
stage writes into a db_dir. A database already in the Spider layout is linked by its folder, so every SQLite file
beside it (test-suite accuracy) comes along. The folder is built beside its place and swapped in whole; an existing
folder is replaced only when it holds nothing but such links.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sqltune.errors import SqltuneError


def _only_links(folder: Path) -> bool:
    """Whether `folder` holds nothing but links, directly or one folder down (what link_databases writes)."""
    for entry in folder.iterdir():
        if entry.is_symlink():
            continue
        if not entry.is_dir() or any(not inner.is_symlink() for inner in entry.iterdir()):
            return False
    return True


def link_databases(folder: Path, databases: dict[str, Path]) -> None:
    """Write `folder` as `<db_id>/<db_id>.sqlite` links to `databases` (db_id -> file), replacing an earlier one."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not (folder.is_dir() and _only_links(folder))):
        raise SqltuneError(f"{folder} exists and is not a folder of database links prepare wrote: move it away or "
                           "choose another --name")
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new-", dir=folder.parent))
    old = None
    try:
        for db_id, path in sorted(databases.items()):
            target = Path(path).resolve()
            if target.name == f"{db_id}.sqlite" and target.parent.name == db_id:
                os.symlink(target.parent, stage / db_id, target_is_directory=True)
            else:
                (stage / db_id).mkdir()
                os.symlink(target, stage / db_id / f"{db_id}.sqlite")
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "links")
        os.replace(stage, folder)
    except OSError as exc:
        if old is not None and not folder.exists() and (old / "links").exists():
            os.replace(old / "links", folder)  # the earlier folder back in place
        raise SqltuneError(f"cannot write the database links in {folder}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # rmtree removes links, never what they point to
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
