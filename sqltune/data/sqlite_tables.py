"""A Spider tables.json entry read from a SQLite file, for databases that come without one (`prepare --source
sqlite`): the evaluator's exact match needs the tables and columns, and unifies foreign keys, from it.

Built as Spider's own preprocess/get_tables.py built it: tables in sqlite_master order (SQLite's own `sqlite_*`
tables left out), columns in PRAGMA table_info order after `*`, natural names lower-cased with `_` as a space,
column types folded into text / number / time / boolean / others by the same substring rules, a primary key
as the index of its (first) column, and each foreign-key column pair as [column, referenced column] (a reference without a column
names the referenced table's primary key). The file is opened read-only and immutable: nothing is written beside it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqltune.io import connect_read_only


def column_type(declared: str) -> str:
    """Spider's five column types from a declared SQLite type (get_tables.py's rules, in its order)."""
    t = declared.lower()
    if "char" in t or t == "" or "text" in t or "var" in t:
        return "text"
    if any(k in t for k in ("int", "numeric", "decimal", "number", "id", "real", "double", "float")):
        return "number"
    if any(k in t for k in ("date", "time", "year")):
        return "time"
    if "boolean" in t:
        return "boolean"
    return "others"


def _natural(name: str) -> str:
    return name.lower().replace("_", " ")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def tables_entry(db_path: Path, db_id: str) -> dict:
    """The tables.json entry of one database file; sqlite3.Error when its schema cannot be read."""
    conn = connect_read_only(db_path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")
                 if not r[0].lower().startswith("sqlite_")]
        entry = {"db_id": db_id, "table_names_original": names, "table_names": [_natural(n) for n in names],
                 "column_names_original": [[-1, "*"]], "column_names": [[-1, "*"]], "column_types": ["text"],
                 "primary_keys": [], "foreign_keys": []}
        index: dict[tuple[str, str], int] = {}  # (table, column), lower-cased -> column index
        keys: dict[str, list[str]] = {}  # table -> its primary-key columns, in key order
        references = []
        for t, table in enumerate(names):
            info = conn.execute(f"PRAGMA table_info({_quoted(table)})").fetchall()
            pk = sorted((row[5], row[1]) for row in info if row[5])
            keys[table.lower()] = [name for _, name in pk]
            for _, column, declared, _, _, is_key in info:
                index[(table.lower(), column.lower())] = len(entry["column_names_original"])
                if is_key == 1:  # Spider's rule: a composite key is stated by its first column
                    entry["primary_keys"].append(len(entry["column_names_original"]))
                entry["column_names_original"].append([t, column])
                entry["column_names"].append([t, _natural(column)])
                entry["column_types"].append(column_type(declared or ""))
            for row in conn.execute(f"PRAGMA foreign_key_list({_quoted(table)})").fetchall():
                references.append((table, row[3], row[2], row[4], row[1]))  # table, from, ref table, to, seq
        for table, column, ref_table, ref_column, seq in references:
            if ref_column is None:  # REFERENCES t without a column: t's primary key, column by column
                ref_keys = keys.get(ref_table.lower(), [])
                ref_column = ref_keys[seq] if seq < len(ref_keys) else None
            pair = [index.get((table.lower(), str(column).lower())),
                    index.get((ref_table.lower(), str(ref_column).lower()))]
            if None not in pair and pair not in entry["foreign_keys"]:
                entry["foreign_keys"].append(pair)
        return entry
    finally:
        conn.close()


def readable_entry(db_path: Path, db_id: str) -> tuple[dict | None, str]:
    """(entry, "") or (None, why) for a file whose schema cannot be read."""
    try:
        return tables_entry(db_path, db_id), ""
    except sqlite3.Error as exc:
        return None, f"schema unreadable ({exc})"
