"""What every source yields: per split, questions with gold SQL, the schemas of their databases and where the
databases live (BIRD keeps train and dev databases in different folders, so each split has its own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqltune.io import database_path


@dataclass
class Example:
    db_id: str
    question: str
    query: str  # the source's SQL text, byte for byte (never folded: a TAB inside a literal is part of the query)
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (question, SQL) turns
    evidence: str = ""  # BIRD's external knowledge hint
    difficulty: str = ""  # BIRD's simple / moderate / challenging
    interaction: int = -1  # multi-turn: index of the interaction in the source file (-1: single-turn)
    turn: int = 0  # multi-turn: index of the turn within its interaction


@dataclass
class Split:
    examples: list[Example]
    tables: dict[str, dict]  # db_id -> tables.json entry
    tables_file: Path
    db_dir: Path  # <db_dir>/<db_id>/<db_id>.sqlite
    # db_id -> file, for databases not (yet) in the Spider layout under db_dir: prepare then writes db_dir as a
    # folder of links to them (sqltune.data.dblinks), the layout every later stage reads
    databases: dict[str, Path] = field(default_factory=dict)

    def db_path(self, db_id: str) -> Path:
        return self.databases.get(db_id) or database_path(self.db_dir, db_id)


@dataclass
class SourceData:
    splits: dict[str, Split]
    missing_splits: list[str] = field(default_factory=list)  # asked for but absent (e.g. SParC shipped dev only)
    files: dict[str, str] = field(default_factory=dict)  # more files for the output folder (a built tables.json)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # why -> the input pairs left out for it, named
