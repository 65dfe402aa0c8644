"""Spider 1.0 layout: train_spider.json + train_others.json (train), dev.json, tables.json, database/."""

from __future__ import annotations

from sqltune.data.examples import Example, SourceData, Split
from sqltune.data.sources.common import read_list, read_tables, require_dir, require_file

TRAIN_FILES = ("train_spider.json", "train_others.json")


def load(data_dir: str, splits: list[str]) -> SourceData:
    root = require_dir(data_dir)
    tables_file = root / "tables.json"
    tables = read_tables(tables_file)
    out: dict[str, Split] = {}
    for split in splits:
        if split == "train":
            files = [root / name for name in TRAIN_FILES if (root / name).is_file()]
            if not files:
                require_file(root / TRAIN_FILES[0], "Spider train file")
        elif split == "dev":
            files = [require_file(root / "dev.json", "Spider dev file")]
        else:
            files = [require_file(root / f"{split}.json", f"Spider {split} file")]
        examples = []
        for path in files:
            for row in read_list(path, ("db_id", "question", "query")):
                examples.append(Example(db_id=row["db_id"], question=row["question"], query=row["query"]))
        out[split] = Split(examples, tables, tables_file, root / "database")
    return SourceData(out)
