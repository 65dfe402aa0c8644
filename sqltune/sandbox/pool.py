"""The parent side of the sandbox: long-lived worker processes that run SQL tasks, each killed and replaced the
moment its current step overruns its deadline.

Why processes: SQLite's progress handler runs only between steps, so a LIKE, GLOB or instr over a long string
runs on for minutes inside one step and ignores SIGTERM; only killing the process stops it. The workers are
forked (from a clean forkserver once torch's threads run in the parent), each limits its own address space, and
each dies with its parent. The parent reads every busy worker's deadline from shared memory at least every
0.1 s and kills a worker past it, so every step ends within its timeout plus GRACE plus that tick; Ctrl-C or
SIGTERM in the parent kills every worker at once.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

from sqltune.sandbox.readonly import QueryError
from sqltune.sandbox.worker import GRACE, PHASES, SLOT_SIZE, Limits, serve

_TICK = 0.1
_CHUNK = 16
_PRELOAD = ["sqltune.sandbox.worker", "sqltune.eval.execution", "sqltune.eval.scoring"]


class Killed(QueryError):
    """A task's worker was killed (past its deadline) or died; `phase` and `step` say what it was doing."""

    def __init__(self, reason: str, phase: str, step: int):
        super().__init__(reason)
        self.phase, self.step = phase, step


@dataclass
class _Slot:
    index: int
    process: Any = None
    conn: Any = None
    key: Any = None  # the affinity key of its last chunk
    sent: deque = field(default_factory=deque)  # (task id, item indices) sent and not yet answered, in order


def _context():
    """fork when it is safe (instant, nothing to import again); a clean forkserver once torch has started its
    thread pools (`sqltune run`, predict's vote), since forking a process with running threads can deadlock."""
    if "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class Sandbox:
    """Worker processes for SQL tasks. `init` = (function, args) runs in every worker when it starts (its state
    for the tasks). Use as a context manager, or close()."""

    def __init__(self, workers: int = 1, limits: Limits = Limits(), init: tuple[Callable, tuple] | None = None):
        self.limits, self.init = limits, init
        self.size = max(1, int(workers))
        self._ctx = _context()
        self._shared = self._ctx.RawArray("d", SLOT_SIZE * self.size)
        self._slots = [_Slot(i) for i in range(self.size)]
        self._next_id = 0
        self.killed = 0  # workers killed past their deadline (or dead) so far

    # ------------------------------------------------------------------ workers
    def _start(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe()
        self._shared[SLOT_SIZE * slot.index] = math.inf
        slot.process = self._ctx.Process(target=serve, args=(child, self._shared, slot.index, self.limits,
                                                             self.init), daemon=True, name="sqltune-sql")
        slot.process.start()
        child.close()
        slot.conn = parent

    def _stop(self, slot: _Slot) -> None:
        if slot.process is not None:
            if slot.process.is_alive():
                slot.process.kill()
            slot.process.join(5)
            slot.conn.close()
        slot.process = slot.conn = None
        slot.sent.clear()

    def close(self) -> None:
        for slot in self._slots:
            self._stop(slot)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _where(self, slot: _Slot) -> tuple[float, str, int, int, int]:
        """(deadline, phase, step, task id, position in its chunk) the worker last published."""
        base = SLOT_SIZE * slot.index
        deadline, phase, step, at, task = self._shared[base:base + SLOT_SIZE]
        name = PHASES[int(phase)] if 0 <= int(phase) < len(PHASES) else "work"
        return deadline, name, int(step), int(task), int(at)

    def _send(self, slot: _Slot, fn: Callable, args, each: bool = False, indices: list[int] | None = None) -> None:
        """Send a task; the worker takes it when it is done with what it has (a second one waits in the pipe)."""
        if slot.process is None or not slot.process.is_alive():
            self._stop(slot)
            self._start(slot)
        self._next_id += 1
        if not slot.sent:  # idle: its deadline starts now (a busy worker keeps publishing its own)
            base = SLOT_SIZE * slot.index
            self._shared[base + 1:base + SLOT_SIZE] = [PHASES.index("work"), 0, 0, self._next_id]
            self._shared[base] = time.monotonic() + self.limits.timeout + GRACE
        slot.sent.append((self._next_id, indices or []))
        slot.conn.send((self._next_id, fn, args, each))

    def _collect(self, slot: _Slot) -> tuple[str, Any, str, int]:
        """(kind, value, phase, step) for the oldest task sent to a busy worker: kind "ok", "chunk",
        "query_error", "error", or "" while it works; a worker past its deadline is killed ("killed"), a dead one
        reported ("died"); either way the tasks sent to it stay in `slot.sent` for the caller."""
        if slot.conn.poll():
            try:
                task_id, kind, value = slot.conn.recv()
                if task_id == slot.sent[0][0]:
                    return kind, value, "", 0
            except (EOFError, OSError):
                pass
        deadline, phase, step, _, _ = self._where(slot)
        if slot.process.is_alive() and time.monotonic() <= deadline:
            return "", None, "", 0
        self.killed += 1
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join(5)
            return "killed", f"timed out after {self.limits.timeout:g} s ({phase}; worker stopped)", phase, step
        code = slot.process.exitcode
        return "died", f"worker stopped ({phase}; exit code {code}: the memory bound is the usual cause)", phase, step

    # ------------------------------------------------------------------ tasks
    def call(self, fn: Callable, *args) -> Any:
        """fn(*args) in a worker; QueryError for a query error, Killed when the worker had to be stopped."""
        slot = self._slots[0]
        self._send(slot, fn, args)
        while True:
            wait([slot.conn, slot.process.sentinel], _TICK)
            kind, value, phase, step = self._collect(slot)
            if not kind:
                continue
            if kind in ("killed", "died"):
                self._stop(slot)
                raise Killed(value, phase, step)
            slot.sent.popleft()
            if kind == "ok":
                return value
            raise QueryError(value)

    def map(self, fn: Callable, items: Sequence, key: Callable[[Any], Any] | None = None,
            on_fail: Callable[[Any, str, str, int], Any] | None = None,
            progress: Callable[[int], None] | None = None) -> list:
        """[fn(item) for item in items], run in the workers. Items with the same `key` go to one worker in chunks
        (its caches stay warm; one reply per chunk; two chunks in flight, so a worker never waits for the
        parent). A failed item (killed, died, or fn raised) gets on_fail(item, reason, phase, step) as its
        result; without on_fail the failure is raised. When a worker is killed, the item it was on fails and the
        rest of what it was sent goes back to the queue."""
        results: list = [None] * len(items)
        queues: dict[Any, deque] = {}
        for i, item in enumerate(items):
            queues.setdefault(key(item) if key else None, deque()).append(i)
        active = self._slots[:max(1, min(self.size, len(items)))]
        left = len(items)

        def done(i: int, kind: str, value, phase: str = "", step: int = 0) -> None:
            nonlocal left
            if kind == "ok":
                results[i] = value
            elif on_fail is None:
                raise QueryError(value)
            else:
                results[i] = on_fail(items[i], value, phase, step)
            left -= 1
            if progress:
                progress(1)

        while left:
            for slot in active:
                while len(slot.sent) < 2 and (chunk := self._next_chunk(slot, queues, left, len(active))):
                    self._send(slot, fn, [items[i] for i in chunk], each=True, indices=chunk)
            busy = [s for s in active if s.sent]
            wait([s.conn for s in busy] + [s.process.sentinel for s in busy], _TICK)
            for slot in busy:
                while slot.sent:
                    kind, value, phase, step = self._collect(slot)
                    if not kind:
                        break
                    if kind == "chunk":
                        for i, (one_kind, one_value) in zip(slot.sent.popleft()[1], value):
                            done(i, one_kind, one_value)
                        continue
                    _, _, _, task, at = self._where(slot)  # the worker is gone: where it stopped is final
                    self._fail_sent(slot, task, at, queues, lambda i: done(i, kind, value, phase, step))
        return results

    def _fail_sent(self, slot: _Slot, task: int, at: int, queues: dict, fail: Callable[[int], None]) -> None:
        """A worker was killed or died: the item it was on fails; everything else sent to it is queued again."""
        again: list[int] = []
        for task_id, chunk in slot.sent:
            if task_id == task and chunk:
                at = min(max(at, 0), len(chunk) - 1)
                fail(chunk[at])
                again += chunk[:at] + chunk[at + 1:]
            else:
                again += chunk
        if not any(task_id == task for task_id, _ in slot.sent) and slot.sent:  # died before it said where
            first = slot.sent[0][1]
            fail(first[0])
            again.remove(first[0])
        queues[slot.key].extendleft(reversed(again))
        self._stop(slot)

    @staticmethod
    def _next_chunk(slot: _Slot, queues: dict, left: int, workers: int) -> list[int]:
        """Up to _CHUNK items of the slot's last key; else of the key with the most items left. Small enough
        that the work spreads over every worker to the end."""
        if not queues.get(slot.key):
            waiting = [k for k, q in queues.items() if q]
            if not waiting:
                return []
            slot.key = max(waiting, key=lambda k: len(queues[k]))
        queue = queues[slot.key]
        size = max(1, min(_CHUNK, len(queue), left // (4 * workers)))
        return [queue.popleft() for _ in range(size)]


def default_workers(requested: int, work: int) -> int:
    """Workers for `work` items: the request (0: one per core), never more than the cores or the items."""
    cores = os.cpu_count() or 1
    return max(1, min(requested or cores, cores, work))
