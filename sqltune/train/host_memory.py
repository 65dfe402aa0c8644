"""Host memory over a training run: resident memory in every logged step, and on request the heap that steps freed
handed back to the system.

On a CPU every step's activations are malloc'd and freed on the host. glibc keeps freed memory for reuse, and once
a large block has been freed it keeps blocks below 32 MB on its heap instead of mapping each; with batches of varying
shapes (lengths, shared-prefix groups) what is freed under a block still in use stays resident. A whole Spider run
of Qwen2.5-Coder-0.5B at batch 8 reached 23 GB on a 24 GB machine (210 steps), enough for the kernel to kill it.
Measured over 40 steps of that run (benchmarks/train_memory.py, BENCHMARKS.md "Host memory over a CPU run"):
`malloc_trim` after every step brings resident memory between steps from 9.3 GB down to 2.6 GB, but the run's peak
only from 10.0 to 9.3 GB (a step's own need sets it that early) at 1.18x the time per step (the handed-back pages
are faulted in again); every 10 steps, 1.04x and no lower peak. So it is not on by default: `--trim_host_memory_every
N` trims every N steps; whether it keeps a whole 200-step run's peak down is not measured yet. Fixing glibc's mmap threshold
(MALLOC_MMAP_THRESHOLD_=65536) also stopped the growth but made steps 1.7x slower; MALLOC_ARENA_MAX=2 changed
nothing (30-step runs, same settings).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

from transformers import TrainerCallback

@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl); looked up once."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def give_back_freed_memory() -> bool:
    """Return the pages of freed heap memory to the system; whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_mb() -> float | None:
    """This process's resident memory now, in MB (None where /proc is absent)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


class ReturnFreedMemory(TrainerCallback):
    """Every `every` optimizer steps, the freed heap goes back to the system (see the module's docstring)."""

    def __init__(self, every: int = 1):
        self.every = every

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every == 0:
            give_back_freed_memory()
