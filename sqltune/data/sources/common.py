"""Helpers the readers share: finding files and reading tables.json with clear errors."""

from __future__ import annotations

from pathlib import Path

from sqltune.data.schema import check_tables_entry
from sqltune.errors import SqltuneError
from sqltune.io import read_json


def require_dir(data_dir: str) -> Path:
    if not data_dir:
        raise SqltuneError("--data_dir is required")
    path = Path(data_dir)
    if not path.is_dir():
        raise SqltuneError(f"data folder not found: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SqltuneError(f"{what} not found: {path}")
    return path


def read_tables(path: Path) -> dict[str, dict]:
    entries = read_json(require_file(path, "tables file"))
    if not isinstance(entries, list):
        raise SqltuneError(f"{path} must hold a list of database schemas")
    tables = {}
    for entry in entries:
        check_tables_entry(entry, path)
        tables[entry["db_id"]] = entry
    return tables


def read_list(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = read_json(path)
    if not isinstance(rows, list):
        raise SqltuneError(f"{path} must hold a list of examples")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise SqltuneError(f"{path}: example {i} has no {missing[0]!r} field")
    return rows
