"""Run traces: every command appends JSON-lines spans to a trace file.

A span is `{"run_id", "stage", "start", "end", "duration_s", "status", "figures", "error", "memory"}` (memory: peak
figures, see sqltune/usage.py; absent in spans of earlier versions and in skipped stages). `sqltune run` writes
into `runs/<name>-<timestamp>/trace.jsonl`. A stage command run on its own writes its span (marked
`"kind": "command"`) beside its output: into the output folder (prepare, train, merge, evaluate's report) or the
folder holding the output file (predict); it is never a run of its own in `trace list`. A trace that cannot be
written is a warning, never a failed stage.

    sqltune trace list [--runs_dir runs]          runs: name, date, status, duration, EX
    sqltune trace show RUN [--json]               each stage's timing, peak memory and figures (RUN may be any
                                                  trace folder)
    sqltune trace show RUN --html FILE            the run's page (sqltune/report/) written to FILE
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import append_once
from sqltune.usage import marks, peak_figures

TRACE_FILE = "trace.jsonl"
ENV_TRACE = "SQLTUNE_TRACE"  # set by `sqltune run` so stage spans land in its run folder


def runs_dir() -> Path:
    return Path(os.environ.get("SQLTUNE_RUNS_DIR", "runs"))


def append_span(path: Path, span: dict) -> None:
    """One JSON object per line, written with a single append so concurrent writers do not interleave. A trace
    that cannot be written (read-only folder, full disk, a symbolic link there, which is never followed) is one
    warning: the work it describes is done."""
    try:
        append_once(path, json.dumps(span, default=str) + "\n")
    except (OSError, SqltuneError) as exc:
        why = exc.strerror or exc if isinstance(exc, OSError) else exc
        print(f"sqltune: warning: could not write the trace span to {path}: {why}", file=sys.stderr)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t).isoformat(timespec="seconds")


@contextmanager
def span(trace_path, run_id: str | None, stage: str, **extra):
    """Time a block and record it; the yielded dict collects its key figures. `trace_path` may be a function called
    at the end with the block's status (the place can depend on what the block wrote; None: nowhere); run_id None:
    the trace folder's name."""
    figures: dict = {}
    start, before = time.time(), marks()
    status, error = "ok", None
    try:
        yield figures
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted"
        raise
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        end = time.time()
        keep = {k: v for k, v in figures.items() if isinstance(v, (int, float, str, bool)) or v is None}
        path = trace_path(status) if callable(trace_path) else trace_path
        if path is not None:
            append_span(path, {"run_id": run_id or path.parent.name, "stage": stage, "start": _iso(start),
                               "end": _iso(end), "duration_s": round(end - start, 3), "status": status,
                               "figures": keep, "error": error, "memory": peak_figures(before, marks()), **extra})


def command_trace(cfg, status: str = "ok") -> Path | None:
    """Where a stage command run on its own records its span: the current run's trace when `sqltune run` started
    it, else beside its output (the output folder, or the folder holding an output file). None when the stage
    failed (its error was printed, and its output folder may be one it refused, such as an input folder), when that
    folder does not exist, or when there is no output."""
    target = os.environ.get(ENV_TRACE)
    if target:
        return Path(target)
    if status == "failed":
        return None
    for name in ("output_dir", "report", "out"):
        place = Path(getattr(cfg, name, "") or "")
        if place != Path(""):
            if place.is_dir():
                return place / TRACE_FILE
            return place.parent / TRACE_FILE if place.is_file() else None
    return None


@contextmanager
def command_span(stage: str, cfg):
    """A span for a stage command, written where `command_trace` says once the stage has finished."""
    extra = {} if os.environ.get(ENV_TRACE) else {"kind": "command"}
    with span(lambda status: command_trace(cfg, status), None, stage, **extra) as figures:
        yield figures


def _span(obj) -> dict | None:
    """A span with every key of the right type, or None for a line that is not a span (valid JSON of another
    shape): one bad line never spoils the listing of the other runs."""
    if not isinstance(obj, dict) or not isinstance(obj.get("stage"), str):
        return None
    duration = obj.get("duration_s")
    ok = isinstance(duration, (int, float)) and not isinstance(duration, bool) and math.isfinite(duration)
    figures = obj.get("figures") if isinstance(obj.get("figures"), dict) else {}
    span = {"run_id": str(obj.get("run_id") or ""), "stage": obj["stage"], "start": str(obj.get("start") or ""),
            "end": str(obj.get("end") or ""), "duration_s": float(duration) if ok else 0.0,
            "status": str(obj.get("status") or "unknown"),
            "figures": {str(k): v for k, v in figures.items() if isinstance(v, (int, float, str, bool)) or v is None},
            "error": None if obj.get("error") is None else str(obj["error"])}
    if obj.get("kind"):
        span["kind"] = str(obj["kind"])
    if isinstance(obj.get("memory"), dict):
        span["memory"] = {str(k): v for k, v in obj["memory"].items()
                          if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v))}
    return span


def read_trace(run_dir: Path) -> list[dict]:
    path = run_dir / TRACE_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    spans = []
    for line in text.splitlines():
        try:
            span = _span(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash is skipped, the rest still reads
        if span is not None:
            spans.append(span)
    return spans


def summarize(run_dir: Path, spans: list[dict] | None = None) -> dict:
    spans = read_trace(run_dir) if spans is None else spans
    run_span = next((s for s in reversed(spans) if s["stage"] == "run"), None)
    status = run_span["status"] if run_span is not None else "running or stopped"
    ex = None
    for s in spans:
        for key in ("ex", "ex_finetuned", "ex_all"):
            if s["figures"].get(key) is not None:
                ex = s["figures"][key]
    duration = run_span["duration_s"] if run_span else sum(s["duration_s"] for s in spans)
    return {"name": run_dir.name, "date": next((s["start"] for s in spans if s["start"]), ""), "status": status,
            "duration_s": round(duration, 1), "ex": ex, "stages": len(spans)}


def is_run(run_dir: Path, spans: list[dict]) -> bool:
    """A folder of `sqltune run`, finished or not; not one where stage commands run on their own left their spans
    (`kind: command`, or the `commands` folder of earlier versions): their durations add up to nothing."""
    if any(s["stage"] == "run" for s in spans):
        return True
    return run_dir.name != "commands" and not (spans and all(s.get("kind") == "command" for s in spans))


def list_runs(root: Path) -> list[dict]:
    if not root.is_dir():
        return []
    runs = []
    for folder in sorted(root.iterdir()):
        if (folder / TRACE_FILE).is_file():
            spans = read_trace(folder)
            if is_run(folder, spans):
                runs.append(summarize(folder, spans))
    return runs


def find_run(root: Path, name: str) -> Path:
    direct = Path(name)
    if (direct / TRACE_FILE).is_file():
        return direct
    if (root / name / TRACE_FILE).is_file():
        return root / name
    matches = [d for d in root.iterdir() if d.name.startswith(name) and (d / TRACE_FILE).is_file()] \
        if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SqltuneError(f"run {name!r} is ambiguous: {', '.join(m.name for m in matches)}")
    raise SqltuneError(f"no run {name!r} under {root} (see `sqltune trace list`)")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def peak_text(memory: dict | None, key: str = "peak_rss_mb") -> str:
    """`812 MB`, or `<= 812 MB` where the stage stayed below an earlier stage's peak (sqltune/usage.py); `-`: not
    recorded."""
    value = (memory or {}).get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{'' if memory.get(key + '_in_stage', True) else '<= '}{value:.0f} MB"


def print_runs(root: Path, as_json: bool = False) -> None:
    runs = list_runs(root)
    if as_json:
        print(json.dumps(runs, indent=2))
    elif not runs:
        print(f"no runs under {root}")
    else:
        print(f"{'run':<40} {'date':<20} {'status':<18} {'duration_s':>10} {'EX':>7}")
        for r in runs:
            print(f"{r['name']:<40} {r['date']:<20} {r['status']:<18} {r['duration_s']:>10} {_fmt(r['ex']):>7}")


def print_run(root: Path, name: str, as_json: bool = False) -> None:
    run_dir = find_run(root, name)
    spans = read_trace(run_dir)
    if as_json:
        print(json.dumps({"run": run_dir.name, "spans": spans}, indent=2))
        return
    print(f"run {run_dir.name} ({run_dir})")
    print(f"{'stage':<22} {'status':<12} {'duration_s':>10} {'peak RSS':>11}  figures")
    for s in spans:
        figs = ", ".join(f"{k}={_fmt(v)}" for k, v in s["figures"].items())
        err = f"  error: {s['error']}" if s.get("error") else ""
        print(f"{s['stage']:<22} {s['status']:<12} {s['duration_s']:>10.1f} {peak_text(s.get('memory')):>11}  "
              f"{figs}{err}")
