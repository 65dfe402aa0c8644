"""BIRD layout: <split>.json, <split>_tables.json, <split>_databases/<db>/<db>.sqlite; evidence goes in the prompt."""

from __future__ import annotations

from sqltune.data.examples import Example, SourceData, fold_sql
from sqltune.data.sources.common import read_list, read_tables, require_dir, require_file
from sqltune.errors import SqltuneError


def load(data_dir: str, splits: list[str]) -> SourceData:
    root = require_dir(data_dir)
    tables: dict[str, dict] = {}
    out: dict[str, list[Example]] = {}
    db_dir = None
    tables_file = None
    for split in splits:
        path = require_file(root / f"{split}.json", f"BIRD {split} file")
        tables_file = require_file(root / f"{split}_tables.json", f"BIRD {split} tables file")
        tables.update(read_tables(tables_file))
        split_db_dir = root / f"{split}_databases"
        if db_dir is None or split == "dev":
            db_dir = split_db_dir
        out[split] = [
            Example(db_id=row["db_id"], question=row["question"], query=fold_sql(row["SQL"]),
                    evidence=row.get("evidence", "") or "", difficulty=row.get("difficulty", "") or "")
            for row in read_list(path, ("db_id", "question", "SQL"))
        ]
    if db_dir is None:
        raise SqltuneError("no split to prepare")
    return SourceData(tables=tables, db_dir=db_dir, tables_file=tables_file, splits=out)
