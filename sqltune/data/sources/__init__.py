"""Dataset readers, one small module per layout. Each exposes `load(data_dir, splits) -> SourceData`."""

from __future__ import annotations

from importlib import import_module

from sqltune.data.examples import SourceData


def load_source(name: str, data_dir: str, splits: list[str]) -> SourceData:
    module = import_module(f"sqltune.data.sources.{name}")
    return module.load(data_dir, splits)
