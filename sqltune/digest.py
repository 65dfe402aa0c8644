"""What files and folders hold, as digests for identities: a stage or a prediction whose inputs changed in place
(same path, new content) must not pass for the finished one. Imports no torch.

Files up to HASH_LIMIT are digested by content; bigger ones (weights, large databases) by size and modification
time, which any rewrite changes, so a 30 GB folder costs a directory walk, not a read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HASH_LIMIT = 64 << 20
MODEL_FILES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".py", ".yaml", ".gguf", ".pt")


def add_file(h, path: Path, name: str | None = None) -> None:
    """A file's name and content into the digest; a file over HASH_LIMIT, or one this user may not read (a stage
    that needs it says so itself), by its size and mtime."""
    st = path.stat()
    h.update((name or path.name).encode() + b"\0")
    if st.st_size <= HASH_LIMIT:
        try:
            h.update(hashlib.sha256(path.read_bytes()).digest())
            return
        except PermissionError:
            pass
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())


def folder_digest(folder: Path, suffixes: tuple[str, ...]) -> str:
    """The files directly in `folder` with these suffixes (a model or adapter folder), however its path is spelled."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix in suffixes:
            add_file(h, path)
    return h.hexdigest()


def model_digest(folder: Path) -> str:
    """What a model or adapter folder holds (its weights, config and tokenizer files), however its path is spelled."""
    return folder_digest(Path(folder), MODEL_FILES)


def records_digest(records: list[dict]) -> str:
    """The records a stage read (a prediction answers them, a training run learns from them)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def files_digest(paths: list[Path]) -> str:
    """A set of files, e.g. the databases a vote runs candidates on."""
    h = hashlib.sha256()
    for path in sorted({Path(p).resolve() for p in paths}):
        add_file(h, path)
    return h.hexdigest()


def tree_digest(path: Path) -> str:
    """A file, or every file below a folder named by its relative path (hidden files and folders left out: locks,
    caches, version control)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        add_file(h, path)
        return h.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if not any(part.startswith(".") for part in rel.parts):
            add_file(h, file, rel.as_posix())
    return h.hexdigest()
