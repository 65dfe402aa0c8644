"""Schema styles: how a database is stated in the prompt.

- `words`: sentences, exactly as DB-GPT-Hub's data processor states a schema (original table and column names
  from tables.json), so our records equal the reference's byte for byte;
- `ddl`: CREATE TABLE statements with primary and foreign keys, read from the SQLite file (read-only);
- `ddl+rows`: the same, plus N sample rows per table;
- `mschema`: a compact M-Schema-like listing: per table, each column with its type, whether it is the primary key
  and a few short distinct example values read from the database; then the foreign keys.

Each style returns a list of blocks (a header, one per table, then keys), each ending with its own separator, so the
schema text is `"".join(blocks)` and a token budget can drop whole blocks from the end before cutting text.

A database file that cannot be used (0 bytes, not SQLite, a damaged page met while reading it) is stated from
tables.json as an absent one is, whole (never half from the file), and `warn(path, why)` is told; the caller names
each file once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from sqltune.errors import SqltuneError
from sqltune.io import connect_read_only


def check_tables_entry(entry: dict, tables_file: Path | str) -> None:
    """Reject a tables.json entry whose table or column indices point nowhere (one line, naming the db)."""
    db_id = entry.get("db_id", "?")
    for key in ("db_id", "table_names_original", "column_names_original"):
        if key not in entry:
            raise SqltuneError(f"{tables_file}: database {db_id!r} has no {key!r}")
    tables, columns = entry["table_names_original"], entry["column_names_original"]
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        raise SqltuneError(f"{tables_file}: database {db_id!r} 'table_names_original' must be a list of names")
    n_tables = len(tables)
    for i, column in enumerate(columns if isinstance(columns, list) else [None]):
        if not (isinstance(column, list) and len(column) == 2 and isinstance(column[0], int)
                and isinstance(column[1], str)):
            raise SqltuneError(f"{tables_file}: database {db_id!r} column {i} must be [table index, name], "
                               f"not {column!r}"[:300])
        table_idx, name = column
        if table_idx >= n_tables or table_idx < -1:
            raise SqltuneError(f"{tables_file}: database {db_id!r} column {i} ({name!r}) names table "
                               f"index {table_idx}, but there are {n_tables} tables")
    for kind, groups in (("primary key", entry.get("primary_keys", [])), ("foreign key", entry.get("foreign_keys", []))):
        for group in groups if isinstance(groups, list) else [None]:
            if kind == "foreign key" and not (isinstance(group, list) and len(group) == 2):
                raise SqltuneError(f"{tables_file}: database {db_id!r} foreign key {group!r} is not a pair of "
                                   "column indices")
            for col in group if isinstance(group, list) else [group]:
                if not isinstance(col, int) or not 0 <= col < len(columns):
                    raise SqltuneError(f"{tables_file}: database {db_id!r} {kind} column index {col!r} is out of "
                                       f"range (0..{len(columns) - 1})")


def schema_in_words(entry: dict) -> list[str]:
    """DB-GPT-Hub's sentences (sql_data_process.py, decode_json_file), rule for rule:

    `<db> contains tables such as a, b. ` then per table `Table a has columns such as x, y. ` (columns from
    column_names_original, in order; a table with no columns gives an empty list) followed, for each primary key
    on that table in primary_keys order, by `x is the primary key.\\n`; then per foreign key pair
    `The x of a is the foreign key of y of b.\\n`. A table without a primary key ends with `. ` and the next
    table follows on the same line. Names keep their original spelling and case.
    One deliberate difference: a composite primary key given as a list (BIRD; never in Spider, SParC or CoSQL)
    is stated only on the table holding its columns; the reference also writes `The combination of () are the
    primary key.` on every other table.
    """
    tables = entry["table_names_original"]
    columns = entry["column_names_original"]
    blocks = [f"{entry['db_id']} contains tables such as {', '.join(tables)}. "]
    for i, table in enumerate(tables):
        text = f"Table {table} has columns such as {', '.join(name for t, name in columns if t == i)}. "
        for pk in entry.get("primary_keys", []):
            if isinstance(pk, list):
                names = [columns[c][1] for c in pk if columns[c][0] == i]
                if names:
                    text += f"The combination of ({', '.join(names)}) are the primary key.\n"
            elif columns[pk][0] == i:
                text += f"{columns[pk][1]} is the primary key.\n"
        blocks.append(text)
    for a, b in entry.get("foreign_keys", []):
        (ta, ca), (tb, cb) = columns[a], columns[b]
        blocks.append(f"The {ca} of {tables[ta]} is the foreign key of {cb} of {tables[tb]}.\n")
    return blocks


def _quote(name: str) -> str:
    return f'"{name}"' if not name.replace("_", "").isalnum() else name


def _ident(name: str) -> str:
    """An identifier quoted for a query we run ourselves."""
    return '"' + name.replace('"', '""') + '"'


def _keys(entry: dict) -> tuple[dict[int, list[str]], list[tuple[int, str, int, str]]]:
    """Primary-key column names per table index, and foreign keys as (table, column, ref table, ref column)."""
    columns = entry["column_names_original"]
    pks: dict[int, list[str]] = {}
    for pk in entry.get("primary_keys", []):
        for c in pk if isinstance(pk, list) else [pk]:
            pks.setdefault(columns[c][0], []).append(columns[c][1])
    fks = [(columns[a][0], columns[a][1], columns[b][0], columns[b][1]) for a, b in entry.get("foreign_keys", [])]
    return pks, fks


Warn = Callable[[Path, str], None]  # (database file, why it cannot be used)


class UnusableDatabase(Exception):
    """A database file that cannot be read (raised inside a style, caught by render_schema)."""


def _open(db_path: Path | None) -> sqlite3.Connection | None:
    """A read-only connection whose schema table has been read, or None when there is no file; an empty or
    unreadable file is UnusableDatabase."""
    if db_path is None or not Path(db_path).is_file():
        return None
    try:
        if Path(db_path).stat().st_size == 0:
            raise UnusableDatabase("empty file (0 bytes)")
        conn = connect_read_only(db_path)
    except OSError as exc:
        raise UnusableDatabase(f"cannot be read ({exc.strerror or exc})") from None
    except sqlite3.Error as exc:
        raise UnusableDatabase(f"SQLite: {exc}") from None
    try:
        conn.execute("SELECT name FROM sqlite_master").fetchall()
    except sqlite3.Error as exc:
        conn.close()
        raise UnusableDatabase(f"SQLite: {exc}") from None
    return conn


def _query(conn: sqlite3.Connection, sql: str) -> list:
    """Rows of one read of ours; a damaged file (SQLite's "malformed", "not a database") is UnusableDatabase, other
    errors (a table or column tables.json names and the file lacks) pass as they are."""
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as exc:
        raise UnusableDatabase(f"SQLite: {exc}") from None


def schema_as_ddl(entry: dict, db_path: Path | None, sample_rows: int = 0) -> list[str]:
    """CREATE TABLE statements with PKs and FKs; from the database when present, else from tables.json."""
    tables = entry["table_names_original"]
    columns = entry["column_names_original"]
    types = entry.get("column_types") or ["text"] * len(columns)
    pks, fk_list = _keys(entry)
    fks: dict[int, list[str]] = {}
    for ta, ca, tb, cb in fk_list:
        fks.setdefault(ta, []).append(f"FOREIGN KEY ({_quote(ca)}) REFERENCES {_quote(tables[tb])}({_quote(cb)})")
    conn = _open(db_path)
    blocks = []
    try:
        for i, table in enumerate(tables):
            col_defs = []
            if conn is not None:
                info = _query(conn, f"PRAGMA table_info({_ident(table)})")
                col_defs = [(row[1], row[2] or "text") for row in info]
            if not col_defs:  # no database (or an empty table definition): state it from tables.json
                col_defs = [(name, types[j]) for j, (t, name) in enumerate(columns) if t == i]
            lines = [f"  {_quote(name)} {ctype}" for name, ctype in col_defs]
            if pks.get(i):
                lines.append(f"  PRIMARY KEY ({', '.join(_quote(c) for c in pks[i])})")
            lines.extend(f"  {fk}" for fk in fks.get(i, []))
            text = f"CREATE TABLE {_quote(table)} (\n" + ",\n".join(lines) + "\n);\n"
            if sample_rows and conn is not None:
                try:
                    rows = _query(conn, f"SELECT * FROM {_ident(table)} LIMIT {int(sample_rows)}")
                except sqlite3.OperationalError:  # tables.json names a table the database does not have
                    rows = []
                if rows:
                    shown = "\n".join("  " + " | ".join(str(v)[:40] for v in row) for row in rows)
                    text += f"/* {len(rows)} example rows from {table}:\n{shown}\n*/\n"
            blocks.append(text)
    finally:
        if conn is not None:
            conn.close()
    return blocks


EXAMPLE_MAX_CHARS = 30  # longer values (free text, ids of documents) say little and cost many tokens
EXAMPLE_SCAN_ROWS = 10000  # bound the scan per column on large (BIRD) tables


def example_values(conn: sqlite3.Connection, table: str, column: str, n: int) -> list[str]:
    """Up to `n` distinct, short, non-empty values of a column, in table order (read-only query)."""
    col = _ident(column)
    sql = (f"SELECT DISTINCT {col} FROM (SELECT {col} FROM {_ident(table)} LIMIT {EXAMPLE_SCAN_ROWS}) "
           f"WHERE {col} IS NOT NULL LIMIT {4 * n + 8}")
    try:
        values = [row[0] for row in _query(conn, sql)]
    except sqlite3.OperationalError:  # tables.json names a column the database does not have
        return []
    out = []
    for value in values:
        if isinstance(value, bytes):
            continue
        text = " ".join(str(value).split())
        if text and len(text) <= EXAMPLE_MAX_CHARS and text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def schema_as_mschema(entry: dict, db_path: Path | None, examples: int = 3) -> list[str]:
    """M-Schema-like (XiYan-SQL): `【DB_ID】 db`, then per table `# Table: t` and a bracketed list of
    `(column:TYPE, Primary Key, Examples: [v1, v2])`, then `【Foreign keys】` lines `a.x=b.y`.
    Types come from the database when present (else tables.json); example values only from the database."""
    tables = entry["table_names_original"]
    columns = entry["column_names_original"]
    types = entry.get("column_types") or ["text"] * len(columns)
    pks, fks = _keys(entry)
    conn = _open(db_path)
    blocks = [f"【DB_ID】 {entry['db_id']}\n【Schema】\n"]
    try:
        for i, table in enumerate(tables):
            db_types: dict[str, str] = {}
            if conn is not None:
                info = _query(conn, f"PRAGMA table_info({_ident(table)})")
                db_types = {row[1].lower(): row[2] for row in info if row[2]}
            lines = []
            for j, (t, name) in enumerate(columns):
                if t != i:
                    continue
                parts = [f"{name}:{(db_types.get(name.lower()) or types[j]).upper()}"]
                if name in pks.get(i, []):
                    parts.append("Primary Key")
                values = example_values(conn, table, name, examples) if conn is not None and examples else []
                if values:
                    parts.append(f"Examples: [{', '.join(values)}]")
                lines.append(f"({', '.join(parts)})")
            blocks.append(f"# Table: {table}\n[\n" + ",\n".join(lines) + "\n]\n")
    finally:
        if conn is not None:
            conn.close()
    for n, (ta, ca, tb, cb) in enumerate(fks):
        blocks.append(("【Foreign keys】\n" if n == 0 else "") + f"{tables[ta]}.{ca}={tables[tb]}.{cb}\n")
    return blocks


def render_schema(entry: dict, style: str, db_path: Path | None, sample_rows: int = 0,
                  warn: Warn | None = None) -> list[str]:
    """The schema blocks of `entry` in `style`; a database file that cannot be used is told to `warn` and the schema
    is stated from tables.json alone, as for an absent file."""
    if style == "words":
        return schema_in_words(entry)
    if style not in ("ddl", "ddl+rows", "mschema"):
        raise SqltuneError(f"unknown schema style {style!r}")
    try:
        return _render(entry, style, db_path, sample_rows)
    except UnusableDatabase as exc:
        if warn is not None:
            warn(Path(db_path), str(exc))
        return _render(entry, style, None, sample_rows)


def _render(entry: dict, style: str, db_path: Path | None, sample_rows: int) -> list[str]:
    if style == "mschema":
        return schema_as_mschema(entry, db_path, sample_rows)
    return schema_as_ddl(entry, db_path, sample_rows if style == "ddl+rows" else 0)
