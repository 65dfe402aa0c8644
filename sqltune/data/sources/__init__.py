"""Dataset readers, one small module per layout. Each exposes `load(data_dir, splits) -> SourceData` (or
`load_config(cfg, splits)`)."""

from __future__ import annotations

from importlib import import_module

from sqltune.data.examples import SourceData


def load_source(name: str, data_dir: str, splits: list[str], cfg=None) -> SourceData:
    """A reader that needs more than a folder (sqlite: pairs files, a dev fraction) has `load_config(cfg, splits)`."""
    module = import_module(f"sqltune.data.sources.{name}")
    if hasattr(module, "load_config"):
        return module.load_config(cfg, splits)
    return module.load(data_dir, splits)
