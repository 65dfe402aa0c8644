"""File handling shared by every stage: atomic writes, single-write appends, readers, read-only SQLite.

Outputs are written to a temporary file beside the target and renamed into place, so a crash never
leaves a half-written file behind; line logs are appended with one write call, so lines never interleave.
No writer here goes through a symbolic link: a rename replaces the link itself, and an append or a truncation
refuses one (a link planted where an output goes must never reach the file it points to).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqltune.errors import SqltuneError


def logging_to_file() -> bool:
    """True when stderr is not a terminal (a log file, a pipe): carriage-return progress bars would show only their
    first frame there, so stages print one progress line per step instead."""
    import sys

    return not sys.stderr.isatty()


@contextmanager
def environ_set(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set within the block, and each name as it was before after it (also a name the
    caller had set: it is restored, not removed)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A fresh folder in `parent` with the mode a plain mkdir gives (mkdtemp's is 0700 whatever the umask), for
    work that is renamed into place as an output."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~umask())
    return path


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """Yield a file handle whose content replaces `path` only if the block finishes without error. The file gets
    the mode a plain open() gives (mkstemp's is 0600 whatever the umask). A link at `path` is replaced, not
    followed (the rename takes the link's place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def interaction_text(items: list[tuple[object, str]]) -> str:
    """(interaction, line) pairs as a gold or prediction file: a line each; where lines belong to interactions (not
    None), a blank line after each interaction, the last one too (the official SParC/CoSQL evaluator keeps an
    interaction only when a blank line ends it)."""
    lines: list[str] = []
    for i, (interaction, line) in enumerate(items):
        if i and interaction is not None and interaction != items[i - 1][0]:
            lines.append("")
        lines.append(line)
    if items and items[-1][0] is not None:
        lines.append("")
    return "".join(line + "\n" for line in lines)


def append_once(path: str | Path, text: str, sync: bool = False) -> None:
    """Append `text` with a single write call (whole lines land together); create the file if needed. A write cut
    short (a full disk) goes on with the rest, so the error of the next write is raised instead of lines silently
    missing. A link or anything but a plain file at `path` is refused, never written through."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = open_plain(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        left = memoryview(text.encode())
        while left:
            left = left[os.write(fd, left):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def open_plain(path: str | Path, flags: int) -> int:
    """os.open that never follows a link at `path` and opens only a plain file (a FIFO would block, a device is
    nobody's output); a refusal is one line naming the path. New files get the mode the umask gives."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SqltuneError(f"{path} is a symbolic link: sqltune never writes through one (remove it, or choose "
                               "another output)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SqltuneError(f"{path} is not a plain file: sqltune writes only plain files (remove it, or choose "
                           "another output)")
    return fd


def truncate(path: str | Path, size: int) -> None:
    """Cut a file of ours to `size` bytes; a link at `path` is refused, not followed."""
    fd = open_plain(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def refuse_link(path: str | Path, what: str) -> None:
    """One line when `path` is a symbolic link: an output or a file sqltune continues must be its own."""
    if os.path.islink(path):
        raise SqltuneError(f"{what} {path} is a symbolic link: sqltune never writes through one (remove it, or "
                           "choose another output)")


def swap_in(new: Path, target: Path) -> None:
    """Put the finished folder `new` in place of `target` as one unit (two renames: the old folder is moved aside
    first and removed last, so `target` holds the old or the new folder, never a mix)."""
    old = None
    if os.path.lexists(target):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def database_path(db_dir: str | Path, db_id: str) -> Path:
    """Where a Spider-layout database lives: `<db_dir>/<db_id>/<db_id>.sqlite` (every stage uses this rule)."""
    return Path(db_dir) / db_id / f"{db_id}.sqlite"


def connect_read_only(db_path: str | Path) -> sqlite3.Connection:
    """Open a SQLite file so that nothing can change it and nothing is created beside it; undecodable text bytes
    are dropped.

    URI `mode=ro&immutable=1`: read-only, and no locks, journal, -wal or -shm files (a plain read-only open of a
    WAL-mode database creates -wal/-shm). The price: changes still in a -wal file beside it are not read.
    """
    uri = Path(db_path).resolve().as_uri() + "?mode=ro&immutable=1"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    conn.text_factory = lambda b: b.decode(errors="ignore")
    return conn


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def _decode(data: bytes, path: Path, line_offset: int = 0) -> str:
    """UTF-8 text (a leading BOM dropped); other bytes are a one-line error naming the file, line and byte."""
    try:
        return data.decode("utf-8-sig" if line_offset <= 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line = line_offset or data[:exc.start].count(b"\n") + 1
        raise SqltuneError(f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} cannot be "
                           "decoded (save the file as UTF-8)") from None


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing, non-UTF-8 or malformed file is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SqltuneError(f"file not found: {path}")
    try:
        return json.loads(_decode(path.read_bytes(), path))
    except json.JSONDecodeError as exc:
        raise SqltuneError(f"malformed JSON in {path} at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def read_jsonl(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise SqltuneError(f"file not found: {path}")
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise SqltuneError(f"malformed JSON in {path} at line {lineno}: {exc.msg}") from None


def refuse_overlap(out: str | Path, inputs: dict[str, Path], option: str, stage: str) -> None:
    """Refuse an output that is, contains or lies inside one of a stage's inputs (paths resolved, links followed):
    replacing the output would destroy the input."""
    target = Path(out).expanduser().resolve()
    for what, path in inputs.items():
        src = Path(path).expanduser().resolve()
        if target == src or target in src.parents or src in target.parents:
            relation = "is" if target == src else ("contains" if target in src.parents else "lies inside")
            raise SqltuneError(f"{option} {out} {relation} the {what} {path}: choose another --{option} "
                               f"({stage} never writes into its inputs)")
