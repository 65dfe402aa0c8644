"""Schema styles: how a database is stated in the prompt.

- `words`: sentences, as DB-GPT-Hub states Spider schemas (original table and column names from tables.json);
- `ddl`: CREATE TABLE statements with primary and foreign keys, read from the SQLite file (read-only);
- `ddl+rows`: the same, plus N sample rows per table.

Each style returns a list of blocks (one per table, then keys) so that a token budget can drop whole blocks
from the end before cutting text.
"""

from __future__ import annotations

from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import connect_read_only


def check_tables_entry(entry: dict, tables_file: Path | str) -> None:
    """Reject a tables.json entry whose table or column indices point nowhere (one line, naming the db)."""
    db_id = entry.get("db_id", "?")
    for key in ("db_id", "table_names_original", "column_names_original"):
        if key not in entry:
            raise SqltuneError(f"{tables_file}: database {db_id!r} has no {key!r}")
    n_tables = len(entry["table_names_original"])
    columns = entry["column_names_original"]
    for i, (table_idx, name) in enumerate(columns):
        if table_idx >= n_tables or table_idx < -1:
            raise SqltuneError(f"{tables_file}: database {db_id!r} column {i} ({name!r}) names table "
                               f"index {table_idx}, but there are {n_tables} tables")
    for pk in entry.get("primary_keys", []):
        for col in pk if isinstance(pk, list) else [pk]:
            if not 0 <= col < len(columns):
                raise SqltuneError(f"{tables_file}: database {db_id!r} primary key column index {col} is out of "
                                   f"range (0..{len(columns) - 1})")
    for pair in entry.get("foreign_keys", []):
        for col in pair:
            if not 0 <= col < len(columns):
                raise SqltuneError(f"{tables_file}: database {db_id!r} foreign key column index {col} is out of "
                                   f"range (0..{len(columns) - 1})")


def _columns_of(entry: dict, table_idx: int) -> list[str]:
    return [name for t, name in entry["column_names_original"] if t == table_idx]


def schema_in_words(entry: dict) -> list[str]:
    """`<db> contains tables such as a, b. Table a has columns such as x, y. x is the primary key.` ..."""
    tables = entry["table_names_original"]
    columns = entry["column_names_original"]
    blocks = [f"{entry['db_id']} contains tables such as {', '.join(tables)}."]
    pk_by_table: dict[int, list[list[str]]] = {}
    for pk in entry.get("primary_keys", []):
        cols = pk if isinstance(pk, list) else [pk]
        pk_by_table.setdefault(columns[cols[0]][0], []).append([columns[c][1] for c in cols])
    for i, table in enumerate(tables):
        text = f"Table {table} has columns such as {', '.join(_columns_of(entry, i))}."
        for names in pk_by_table.get(i, []):
            if len(names) == 1:
                text += f" {names[0]} is the primary key."
            else:
                text += f" {', '.join(names)} together are the primary key."
        blocks.append(text)
    for a, b in entry.get("foreign_keys", []):
        ta, ca = columns[a]
        tb, cb = columns[b]
        blocks.append(f"The {ca} of {tables[ta]} is the foreign key of {cb} of {tables[tb]}.")
    return blocks


def _quote(name: str) -> str:
    return f'"{name}"' if not name.replace("_", "").isalnum() else name


def schema_as_ddl(entry: dict, db_path: Path | None, sample_rows: int = 0) -> list[str]:
    """CREATE TABLE statements with PKs and FKs; from the database when present, else from tables.json."""
    tables = entry["table_names_original"]
    columns = entry["column_names_original"]
    types = entry.get("column_types") or ["text"] * len(columns)
    pks: dict[int, list[str]] = {}
    for pk in entry.get("primary_keys", []):
        cols = pk if isinstance(pk, list) else [pk]
        pks.setdefault(columns[cols[0]][0], []).extend(columns[c][1] for c in cols)
    fks: dict[int, list[str]] = {}
    for a, b in entry.get("foreign_keys", []):
        ta, ca = columns[a]
        tb, cb = columns[b]
        fks.setdefault(ta, []).append(f"FOREIGN KEY ({_quote(ca)}) REFERENCES {_quote(tables[tb])}({_quote(cb)})")

    conn = connect_read_only(db_path) if db_path is not None and Path(db_path).is_file() else None
    blocks = []
    try:
        for i, table in enumerate(tables):
            if conn is not None:
                info = conn.execute(f"PRAGMA table_info({_quote(table)})").fetchall()
                col_defs = [(row[1], row[2] or "text") for row in info]
            else:
                col_defs = []
            if not col_defs:  # no database (or an empty table definition): state it from tables.json
                col_defs = [(name, types[j]) for j, (t, name) in enumerate(columns) if t == i]
            lines = [f"  {_quote(name)} {ctype}" for name, ctype in col_defs]
            if pks.get(i):
                lines.append(f"  PRIMARY KEY ({', '.join(_quote(c) for c in pks[i])})")
            lines.extend(f"  {fk}" for fk in fks.get(i, []))
            text = f"CREATE TABLE {_quote(table)} (\n" + ",\n".join(lines) + "\n);"
            if sample_rows and conn is not None:
                rows = conn.execute(f"SELECT * FROM {_quote(table)} LIMIT {int(sample_rows)}").fetchall()
                if rows:
                    shown = "\n".join("  " + " | ".join(str(v)[:40] for v in row) for row in rows)
                    text += f"\n/* {len(rows)} example rows from {table}:\n{shown}\n*/"
            blocks.append(text)
    finally:
        if conn is not None:
            conn.close()
    return blocks


def render_schema(entry: dict, style: str, db_path: Path | None, sample_rows: int = 0) -> list[str]:
    if style == "words":
        return schema_in_words(entry)
    if style == "ddl":
        return schema_as_ddl(entry, db_path, 0)
    if style == "ddl+rows":
        return schema_as_ddl(entry, db_path, sample_rows)
    raise SqltuneError(f"unknown schema style {style!r}")
