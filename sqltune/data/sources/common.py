"""Helpers the readers share: finding files, reading tables.json and checking examples, with one-line errors."""

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
    """The one tables.json reader (prepare and evaluation): db_id -> entry, every entry checked."""
    entries = read_json(require_file(Path(path), "tables file"))
    if not isinstance(entries, list):
        raise SqltuneError(f"{path} must hold a list of database schemas")
    tables = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SqltuneError(f"{path}: entry {i} is not a database schema (a JSON object)")
        if not isinstance(entry.get("db_id"), str) or not entry["db_id"]:
            raise SqltuneError(f"{path}: entry {i} has no 'db_id' (the database name)")
        check_tables_entry(entry, path)
        tables[entry["db_id"]] = entry
    return tables


def read_list(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The examples of one file; each must be an object whose `keys` hold text."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise SqltuneError(f"{path} must hold a list of examples")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SqltuneError(f"{path}: example {i} is not a JSON object")
        for key in keys:
            text_field(row, key, path, f"example {i}")
    return rows


def text_field(row: dict, key: str, path: Path, where: str, optional: bool = False) -> str:
    """`row[key]` as text; a missing key or a value that is not text (123, null) is one line naming file and record."""
    if key not in row:
        if optional:
            return ""
        raise SqltuneError(f"{path}: {where} has no {key!r} field")
    value = row[key]
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise SqltuneError(f"{path}: {where} field {key!r} must be text, not {value!r}"[:300])
    return value
