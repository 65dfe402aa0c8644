"""The worker side of the sandbox: a long-lived process that runs tasks one at a time under an address-space limit,
and tells its parent, through one shared slot, by when the current step must be over.

A task is a picklable function and its arguments. Inside a task, `query()` runs SQL on a read-only connection
(cached per file) and writes its hard deadline (now + timeout + GRACE) and what it is doing into the slot before
it starts; between queries the slot holds now + timeout + GRACE again, so the work around the queries (parsing,
comparing results) is bounded too. The parent kills a worker whose deadline has passed: SQLite's progress handler
cannot stop a LIKE over a long string, which is one step, but SIGKILL can.

Outside a worker (a test or a benchmark calling a task function directly) `query()` runs in the calling process
with the soft timeout only.
"""

from __future__ import annotations

import ctypes
import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sqltune.sandbox.readonly import MB, QueryError, cap_heap, connect, first_rows, run_query

GRACE = 1.0  # seconds past a step's timeout before the parent kills the worker
PHASES = ("idle", "work", "query", "gold query", "predicted query")
MAX_SQL_BYTES = 100_000  # longer model output is not SQL anyone meant: wrong with a named reason, never parsed
_MAX_CONNECTIONS = 32
SLOT_SIZE = 5


@dataclass(frozen=True)
class Limits:
    """Bounds for every query and every worker: seconds per step, rows and bytes per result (every cell counted),
    the worker's address space."""

    timeout: float = 30.0
    max_rows: int = 100_000
    max_bytes: int = 64 * MB
    memory_bytes: int = 768 * MB


class _Worker:
    """This process's slot in the shared array: [deadline (monotonic), phase, step, item, task] per worker (item:
    the position in the chunk being worked on; task: the id of the task)."""

    def __init__(self, slots, index: int, limits: Limits):
        self.slots, self.base, self.limits = slots, SLOT_SIZE * index, limits
        self.connections: dict[Path, object] = {}

    def mark(self, seconds: float, phase: str, step: int | None = None) -> None:
        self.slots[self.base + 1] = PHASES.index(phase)
        if step is not None:
            self.slots[self.base + 2] = step
        self.slots[self.base] = time.monotonic() + seconds + GRACE if math.isfinite(seconds) else math.inf

    def connection(self, path: Path):
        conn = self.connections.get(path)
        if conn is None:
            if len(self.connections) >= _MAX_CONNECTIONS:
                self.connections.pop(next(iter(self.connections))).close()
            conn = self.connections[path] = connect(path, self.limits.max_bytes)
        return conn


_WORKER: _Worker | None = None
_LOCAL_LIMITS = Limits()


def limits() -> Limits:
    """The bounds in force: this worker's, or the defaults outside a worker."""
    return _WORKER.limits if _WORKER is not None else _LOCAL_LIMITS


def in_worker() -> bool:
    return _WORKER is not None


def set_step(step: int) -> None:
    """Say which item of a task is being worked on (the parent reports it when it has to kill the worker)."""
    if _WORKER is not None:
        _WORKER.slots[_WORKER.base + 2] = step


def too_long(sql: str) -> str | None:
    """Why `sql` is not run at all (None when it is run)."""
    size = len(sql.encode("utf-8", "surrogatepass"))
    if size > MAX_SQL_BYTES:
        return f"prediction too long: {size} bytes (at most {MAX_SQL_BYTES} are run)"
    return None


def query(path: str | Path, sql: str, phase: str = "query", timeout: float | None = None) -> list[tuple]:
    """Rows of `sql` on the read-only database `path`, or QueryError; bounded by the worker's limits."""
    return _bounded(path, sql, phase, timeout,
                    lambda conn, seconds, lim: run_query(conn, sql, seconds, lim.max_rows, lim.max_bytes))


def shown_rows(path: str | Path, sql: str, n: int) -> tuple[list[str], list[tuple], bool]:
    """(column names, the first n rows, whether more followed) of `sql`: a task for showing one result (`sqltune
    ask`), where a long result is cut, not failed; bounded as `query` is."""
    return _bounded(path, sql, "query", None,
                    lambda conn, seconds, lim: first_rows(conn, sql, seconds, min(n, lim.max_rows), lim.max_bytes))


def _bounded(path: str | Path, sql: str, phase: str, timeout: float | None, run):
    """run(connection, timeout, limits) on the read-only database `path`, under the worker's deadline."""
    lim = limits()
    timeout = lim.timeout if timeout is None else timeout
    if (why := too_long(sql)) is not None:
        raise QueryError(why)
    if _WORKER is None:
        conn = connect(path, lim.max_bytes)
        try:
            return run(conn, timeout, lim)
        finally:
            conn.close()
    _WORKER.mark(timeout, phase)
    try:
        return run(_WORKER.connection(Path(path)), timeout, lim)
    finally:
        _WORKER.mark(lim.timeout, "work")


def count_rows(item: tuple[str | Path, str]) -> int:
    """The number of rows of (database, sql): a task for checking that queries run and return something."""
    path, sql = item
    return len(query(path, sql))


def _die_with_parent() -> None:
    """SIGKILL this process when the process that forked it ends (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _address_space() -> int:
    """This process's virtual size now (bytes), from /proc; 0 where there is none."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run(task_id: int, fn, args: tuple) -> tuple:
    try:
        return task_id, "ok", fn(*args)
    except QueryError as exc:
        return task_id, "query_error", str(exc)
    except MemoryError:
        return task_id, "error", "out of memory (the worker's memory bound)"
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        return task_id, "error", f"{type(exc).__name__}: {exc}"


def _send(conn, reply: tuple) -> None:
    try:
        conn.send(reply)
    except MemoryError:
        conn.send((reply[0], "error", "out of memory (the worker's memory bound)"))


def serve(conn, slots, index: int, lim: Limits, init) -> None:
    """The worker's loop. (task id, function, args, False) in: one (task id, kind, value) out. (task id, function,
    items, True) in: one (task id, "chunk", [(kind, value) per item]) out, the item being worked on kept in the
    slot (so the parent knows which item a kill hits). None or a closed pipe ends it. The address space may grow by lim.memory_bytes over what the process holds at start."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    _die_with_parent()
    if lim.memory_bytes:
        cap = _address_space() + lim.memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    _WORKER = _Worker(slots, index, lim)
    import sqlite3

    probe = sqlite3.connect(":memory:")
    cap_heap(probe, lim.memory_bytes // 4, lim.memory_bytes // 2)
    probe.close()
    if init is not None:
        init[0](*init[1])
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, fn, args, each = message
        slots[_WORKER.base + 3], slots[_WORKER.base + 4] = 0, task_id
        if not each:
            _WORKER.mark(lim.timeout, "work", 0)
            reply = _run(task_id, fn, args)
        else:
            replies = []
            for k, item in enumerate(args):
                slots[_WORKER.base + 3] = k
                _WORKER.mark(lim.timeout, "work", 0)
                replies.append(_run(task_id, fn, (item,))[1:])
            reply = (task_id, "chunk", replies)
        _WORKER.mark(math.inf, "idle")
        _send(conn, reply)
