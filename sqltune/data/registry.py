"""The dataset registry: `dataset_info.json` in the prepared folder names each file, so later stages can say
`--dataset spider_train` (as DB-GPT-Hub / LLaMA-Factory do). Paths are stored relative to the registry folder
when they lie inside it, absolute otherwise."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import read_json, write_json

REGISTRY = "dataset_info.json"


def _rel(path: Path, root: Path) -> str:
    path, root = Path(path).resolve(), root.resolve()
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def register(root: str | Path, name: str, entry: dict) -> None:
    """Add or replace `name` in `<root>/dataset_info.json` (other entries are kept)."""
    register_many(root, {name: entry})


def register_many(root: str | Path, entries: dict[str, dict]) -> None:
    """Add or replace several entries in one write, so a registry never mixes an old and a new preparation."""
    root = Path(root)
    data = read_registry(root)
    for name, entry in entries.items():
        data[name] = {k: (_rel(v, root) if isinstance(v, Path) else v) for k, v in entry.items()}
    write_json(root / REGISTRY, data)


def read_registry(root: str | Path) -> dict:
    """The registry's entries ({} when there is none yet); anything but a JSON object is one line."""
    path = Path(root) / REGISTRY
    data = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise SqltuneError(f"{path} must hold a JSON object (dataset name -> entry)")
    return data


def lookup(root: str | Path, name: str) -> dict:
    """The entry for `name`, with every path made absolute. Unknown names get a hint."""
    root = Path(root)
    path = root / REGISTRY
    if not path.is_file():
        raise SqltuneError(f"no {REGISTRY} in {root}: run `sqltune prepare --out {root}` first")
    data = read_json(path)
    if name not in data:
        close = difflib.get_close_matches(name, list(data), n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(data)) or 'none'})"
        raise SqltuneError(f"unknown dataset {name!r} in {path}{hint}")
    entry = dict(data[name])
    for key in ("file_name", "gold", "tables", "db_dir", "difficulty", "pairs", "samples"):
        if entry.get(key):
            entry[key] = os.path.join(root, entry[key]) if not os.path.isabs(entry[key]) else entry[key]
    file_name = entry.get("file_name")
    if not file_name or not Path(file_name).is_file():
        raise SqltuneError(f"dataset {name!r} is registered but its file is missing: {file_name}")
    return entry


def lookup_many(root: str | Path, names: str) -> list[dict]:
    items = [n.strip() for n in names.split(",") if n.strip()]
    if not items:
        raise SqltuneError("--dataset is required (a registry name such as spider_train)")
    return [lookup(root, n) for n in items]
