"""The embedded demo dataset (sqltune.data.demo), generated into `data_dir` when it is not there yet."""

from __future__ import annotations

from pathlib import Path

from sqltune.data.examples import SourceData
from sqltune.data.sources import spider


def load(data_dir: str, splits: list[str]) -> SourceData:
    from sqltune.data.demo import generate

    if not (Path(data_dir) / "tables.json").is_file():
        generate(data_dir)
    return spider.load(data_dir, splits)
