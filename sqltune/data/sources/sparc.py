"""SParC layout (multi-turn): <split>.json with interactions, tables.json, database/ (Spider's databases).

Each turn becomes one record whose `history` holds the earlier turns of its interaction. Databases are looked up in
`<data_dir>/database`, else in a sibling `spider/database` folder.
"""

from __future__ import annotations

from pathlib import Path

from sqltune.data.examples import Example, SourceData, fold_sql
from sqltune.data.sources.common import read_list, read_tables, require_dir, require_file


def find_db_dir(root: Path) -> Path:
    for candidate in (root / "database", root.parent / "spider" / "database"):
        if candidate.is_dir():
            return candidate
    return root / "database"


def load(data_dir: str, splits: list[str]) -> SourceData:
    root = require_dir(data_dir)
    tables = read_tables(root / "tables.json")
    out: dict[str, list[Example]] = {}
    for split in splits:
        path = require_file(root / f"{split}.json", f"{split} file")
        examples = []
        for n, item in enumerate(read_list(path, ("database_id", "interaction"))):
            history: list[tuple[str, str]] = []
            for turn in item["interaction"]:
                query = fold_sql(turn["query"])
                examples.append(Example(db_id=item["database_id"], question=turn["utterance"], query=query,
                                        history=list(history), interaction=n))
                history.append((turn["utterance"], query))
        out[split] = examples
    return SourceData(tables=tables, db_dir=find_db_dir(root), tables_file=root / "tables.json", splits=out)
