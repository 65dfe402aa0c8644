"""Peak memory of a block of work (a stage), read without side effects, for its trace span.

The kernel keeps one high-water mark per process (`ru_maxrss`): the largest resident set so far. `sqltune run` runs
every stage in one process, so the mark after a stage is that stage's own peak only when the stage raised it; a
stage that stayed below an earlier stage's peak is known only to have peaked at or below that figure. The mark is
never reset (writing /proc/self/clear_refs would also lower what a parent measuring this process sees), so each
figure says which it is: `*_in_stage` true (the stage's own peak) or false (an upper bound). The same holds for
the largest finished child process (sandbox workers, vLLM's engine) and for CUDA memory when torch is already
loaded with CUDA initialised (torch is never imported here).
"""

from __future__ import annotations

import sys

try:
    import resource
except ImportError:  # not a Unix: no memory figures
    resource = None


def _rss_kb(who) -> int | None:
    if resource is None:
        return None
    value = resource.getrusage(who).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value  # bytes on macOS, kB on Linux


def _gpu_bytes() -> int | None:
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
    except Exception:  # a broken CUDA state must not cost the stage its span
        return None


def marks() -> dict:
    """The high-water marks now: this process, its largest finished child (kB) and CUDA (bytes); None: unknown."""
    return {"rss": _rss_kb(resource.RUSAGE_SELF) if resource else None,
            "children_rss": _rss_kb(resource.RUSAGE_CHILDREN) if resource else None,
            "gpu": _gpu_bytes()}


def peak_figures(before: dict, after: dict) -> dict:
    """The span's memory figures from the marks before and after the block: `peak_rss_mb` (this process),
    `children_peak_rss_mb` (the largest finished child, when there was one), `gpu_peak_mb` (CUDA memory allocated by
    torch, when in use), each with `<name>_in_stage`: true when the block itself raised the mark."""
    out: dict = {}
    for key, name, unit in (("rss", "peak_rss_mb", 1024), ("children_rss", "children_peak_rss_mb", 1024),
                            ("gpu", "gpu_peak_mb", 1024 * 1024)):
        end, start = after.get(key), before.get(key)
        if not end:
            continue
        out[name] = round(end / unit, 1)
        out[f"{name}_in_stage"] = start is None or end > start
    return out
