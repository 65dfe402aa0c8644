"""SParC layout (multi-turn): <split>.json with interactions, tables.json, database/ (Spider's databases).

Each turn becomes one example that knows its interaction, its turn and the earlier turns of its interaction.
Databases are looked up in `<data_dir>/database`, else in a sibling `spider/database` folder. The published dev
folders hold no train split: the splits that are absent are skipped and reported, as long as one is there.
"""

from __future__ import annotations

from pathlib import Path

from sqltune.data.examples import Example, SourceData, Split
from sqltune.data.sources.common import read_list, read_tables, require_dir, text_field
from sqltune.errors import SqltuneError


def find_db_dir(root: Path) -> Path:
    for candidate in (root / "database", root.parent / "spider" / "database"):
        if candidate.is_dir():
            return candidate
    return root / "database"


def read_interactions(path: Path) -> list[Example]:
    examples = []
    for n, item in enumerate(read_list(path, ("database_id",))):
        turns = item.get("interaction")
        if not isinstance(turns, list):
            raise SqltuneError(f"{path}: interaction {n} has no 'interaction' list of turns")
        history: list[tuple[str, str]] = []
        for t, turn in enumerate(turns):
            where = f"interaction {n} turn {t}"
            if not isinstance(turn, dict):
                raise SqltuneError(f"{path}: {where} is not a JSON object")
            question, query = text_field(turn, "utterance", path, where), text_field(turn, "query", path, where)
            examples.append(Example(db_id=item["database_id"], question=question, query=query,
                                    history=list(history), interaction=n, turn=t))
            history.append((question, query))
    return examples


def load(data_dir: str, splits: list[str]) -> SourceData:
    root = require_dir(data_dir)
    tables_file = root / "tables.json"
    tables = read_tables(tables_file)
    present = [s for s in splits if (root / f"{s}.json").is_file()]
    if not present:
        raise SqltuneError(f"none of the splits {', '.join(splits)} is in {root} (looked for "
                           f"{', '.join(s + '.json' for s in splits)})")
    db_dir = find_db_dir(root)
    out = {s: Split(read_interactions(root / f"{s}.json"), tables, tables_file, db_dir) for s in present}
    return SourceData(out, missing_splits=[s for s in splits if s not in present])
