"""Run traces: every command appends JSON-lines spans to its run folder.

A span is `{"run_id", "stage", "start", "end", "duration_s", "status", "figures", "error"}`. `sqltune run` writes
into `runs/<name>-<timestamp>/trace.jsonl`; a stage run on its own writes into `runs/commands/trace.jsonl`.

    sqltune trace list [--runs_dir runs]          runs: name, date, status, duration, EX
    sqltune trace show RUN [--json]               each stage's timing and figures
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import append_once

TRACE_FILE = "trace.jsonl"
ENV_TRACE = "SQLTUNE_TRACE"  # set by `sqltune run` so stage spans land in its run folder


def runs_dir() -> Path:
    return Path(os.environ.get("SQLTUNE_RUNS_DIR", "runs"))


def append_span(path: Path, span: dict) -> None:
    """One JSON object per line, written with a single append so concurrent writers do not interleave."""
    append_once(path, json.dumps(span, default=str) + "\n")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t).isoformat(timespec="seconds")


@contextmanager
def span(trace_path: Path, run_id: str, stage: str):
    """Time a block and record it; the yielded dict collects the block's key figures."""
    figures: dict = {}
    start = time.time()
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
        append_span(trace_path, {"run_id": run_id, "stage": stage, "start": _iso(start), "end": _iso(end),
                                 "duration_s": round(end - start, 3), "status": status, "figures": keep,
                                 "error": error})


@contextmanager
def command_span(stage: str, cfg):
    """A span for a stage command: into the current run's trace, or runs/commands/ when run on its own."""
    target = os.environ.get(ENV_TRACE)
    path = Path(target) if target else runs_dir() / "commands" / TRACE_FILE
    with span(path, path.parent.name, stage) as figures:
        yield figures


def read_trace(run_dir: Path) -> list[dict]:
    path = run_dir / TRACE_FILE
    if not path.is_file():
        return []
    spans = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            spans.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash is skipped, the rest still reads
    return spans


def summarize(run_dir: Path) -> dict:
    spans = read_trace(run_dir)
    run_span = next((s for s in reversed(spans) if s["stage"] == "run"), None)
    if run_span is not None:
        status = run_span["status"]
    elif run_dir.name == "commands":  # stage commands run on their own have no run span
        status = "failed" if any(s["status"] == "failed" for s in spans) else "ok"
    else:
        status = "running or stopped"
    ex = None
    for s in spans:
        for key in ("ex", "ex_finetuned", "ex_all"):
            if s["figures"].get(key) is not None:
                ex = s["figures"][key]
    duration = run_span["duration_s"] if run_span else sum(s["duration_s"] for s in spans)
    return {"name": run_dir.name, "date": spans[0]["start"] if spans else "", "status": status,
            "duration_s": round(duration, 1), "ex": ex, "stages": len(spans)}


def list_runs(root: Path) -> list[dict]:
    if not root.is_dir():
        return []
    return [summarize(d) for d in sorted(root.iterdir()) if (d / TRACE_FILE).is_file()]


def find_run(root: Path, name: str) -> Path:
    direct = Path(name)
    if (direct / TRACE_FILE).is_file():
        return direct
    if (root / name / TRACE_FILE).is_file():
        return root / name
    matches = [d for d in root.iterdir() if d.name.startswith(name) and (d / TRACE_FILE).is_file()] if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SqltuneError(f"run {name!r} is ambiguous: {', '.join(m.name for m in matches)}")
    raise SqltuneError(f"no run {name!r} under {root} (see `sqltune trace list`)")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


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
    print(f"{'stage':<22} {'status':<12} {'duration_s':>10}  figures")
    for s in spans:
        figs = ", ".join(f"{k}={_fmt(v)}" for k, v in s["figures"].items())
        err = f"  error: {s['error']}" if s.get("error") else ""
        print(f"{s['stage']:<22} {s['status']:<12} {s['duration_s']:>10.1f}  {figs}{err}")
