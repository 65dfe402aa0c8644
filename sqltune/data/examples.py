"""What every source yields: questions with gold SQL, and the schemas of their databases."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqltune.io import database_path


@dataclass
class Example:
    db_id: str
    question: str
    query: str
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (question, SQL) turns
    evidence: str = ""  # BIRD's external knowledge hint
    difficulty: str = ""  # BIRD's simple / moderate / challenging
    interaction: int = -1  # multi-turn: index of the interaction (gold files separate them by blank lines)


@dataclass
class SourceData:
    tables: dict[str, dict]  # db_id -> tables.json entry
    db_dir: Path  # <db_dir>/<db_id>/<db_id>.sqlite
    tables_file: Path
    splits: dict[str, list[Example]]

    def db_path(self, db_id: str) -> Path:
        return database_path(self.db_dir, db_id)


def fold_sql(sql: str) -> str:
    """One line per query: tabs and newlines become spaces (gold and prediction files are line-based)."""
    return " ".join(sql.replace("\t", " ").split()) if ("\n" in sql or "\t" in sql or "\r" in sql) else sql.strip()
