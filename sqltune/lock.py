"""One writer per output: an fcntl lock on a lock file beside (or in) the folder or file a command writes.

The holder writes `pid N on HOST` into the file, so a second process is refused with one line naming it. The file is
removed when the holder leaves (while it still holds the lock); an acquirer therefore checks, once it holds the lock,
that the file it locked is still the one at the path, and else locks the new one (the unlink race). A killed holder
leaves the file, but not the lock (the kernel drops it): the next run takes it over.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import open_plain


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it, with its command when it runs on this machine."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    if not text.startswith("pid "):
        return "another process"
    parts = text.split()
    if len(parts) >= 4 and parts[3] == socket.gethostname() and parts[1].isdigit():
        try:
            command = Path(f"/proc/{parts[1]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            command = ""
        if command.strip():
            text += f" ({command.strip()[:120]})"
    return text


def _open(path: Path) -> int:
    try:
        return open_plain(path, os.O_RDWR | os.O_CREAT)
    except PermissionError:
        pass  # another user's lock file: a read-only descriptor still takes (or meets) the lock
    try:
        return open_plain(path, os.O_RDONLY)
    except OSError as exc:
        raise SqltuneError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None


def acquire(path: Path, busy: str, advice: str = "") -> int:
    """The descriptor holding the lock on `path`; a second process gets one line: `busy`, the holder, `advice`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            who = holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise SqltuneError(f"cannot lock {path}: {exc.strerror or exc}") from None
            raise SqltuneError(f"{busy} ({who} holds {path})" + (f": {advice}" if advice else "")) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed it between our open and our lock: lock the file now there
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # a read-only lock file: the lock holds all the same
    return fd


def release(fd: int, path: Path) -> None:
    """Remove the lock file while still holding it (only if it is still ours), then let go."""
    try:
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def held(path: str | Path, busy: str, advice: str = ""):
    """Hold the lock on `path` for the block; the lock file is gone once the block has ended."""
    path = Path(path)
    fd = acquire(path, busy, advice)
    try:
        yield
    finally:
        release(fd, path)
