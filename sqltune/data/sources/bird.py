"""BIRD layout: per split, <split>.json, <split>_tables.json and <split>_databases/<db>/<db>.sqlite, either in
`<data_dir>/<split>/` (as BIRD ships them) or directly in `<data_dir>`. Each split reads its own tables and
databases; evidence goes in the prompt, difficulty into a file beside the gold file. BIRD's train and dev sets
are separate downloads, so a split that is absent is skipped and reported, as long as one is there."""

from __future__ import annotations

from pathlib import Path

from sqltune.data.examples import Example, SourceData, Split
from sqltune.data.sources.common import read_list, read_tables, require_dir, require_file, text_field
from sqltune.errors import SqltuneError


def split_folder(root: Path, split: str) -> Path | None:
    for folder in (root / split, root):
        if (folder / f"{split}.json").is_file():
            return folder
    return None


def load(data_dir: str, splits: list[str]) -> SourceData:
    root = require_dir(data_dir)
    out: dict[str, Split] = {}
    for split in splits:
        folder = split_folder(root, split)
        if folder is None:
            continue
        path = folder / f"{split}.json"
        tables_file = require_file(folder / f"{split}_tables.json", f"BIRD {split} tables file")
        examples = [
            Example(db_id=row["db_id"], question=row["question"], query=row["SQL"],
                    evidence=text_field(row, "evidence", path, f"example {i}", optional=True),
                    difficulty=text_field(row, "difficulty", path, f"example {i}", optional=True))
            for i, row in enumerate(read_list(path, ("db_id", "question", "SQL")))
        ]
        out[split] = Split(examples, read_tables(tables_file), tables_file, folder / f"{split}_databases")
    if not out:
        raise SqltuneError(f"none of the BIRD splits {', '.join(splits)} is in {root} (looked for <split>.json "
                           "there and in <split>/)")
    return SourceData(out, missing_splits=[s for s in splits if s not in out])
