"""What the run's page shows, read from the files of a run folder (stages meet through files; nothing here imports a
stage): the trace (stages, their time and peak memory), the resolved config (how each arm predicted), the training
log, every arm's evaluation (`eval/<arm>/metrics.json` and `per_example.jsonl`) and the folder's files.

Any folder `sqltune trace show` accepts will do: a run, or a stage's own output folder holding its command trace (an
evaluate report folder is then its one arm, a train output folder its training log). What a folder lacks, or a file
that cannot be read, becomes a note on the page, never an error: the page describes what there is.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from urllib.parse import quote

import yaml

from sqltune.eval.report import failure_counts, level_table
from sqltune.trace import TRACE_FILE, peak_text, read_trace, summarize

TRAIN_LOG = "trainer_log.jsonl"  # sqltune.train.sft.TRAIN_LOG (tests/test_report.py keeps the two equal)
METRICS, EXAMPLES = "metrics.json", "per_example.jsonl"
MAX_FILES = 400  # links listed; a bigger folder says how many more there are
SKIP_INSIDE = ("checkpoint-",)  # folders listed as one link, not file by file


def collect(run_dir: Path, page_dir: Path) -> dict:
    """Everything the page shows, as plain values; links are relative to `page_dir` (where the page goes)."""
    spans = read_trace(run_dir)
    notes: list[str] = []
    config = _config(run_dir, notes)
    training = _training(run_dir, config, notes)
    summary = summarize(run_dir, spans)
    return {"run": {**summary, "folder": str(run_dir), "duration": _seconds(summary["duration_s"])},
            "invocations": [_stage_row(s) for s in spans if s["stage"] == "run"],
            "stages": _stages(spans), "training": training, "trainings": _trainings(run_dir, config, notes),
            "arms": _arms(run_dir, spans, config, notes),
            "files": _files(run_dir, page_dir), "notes": notes}


def _config(run_dir: Path, notes: list[str]) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as exc:
        notes.append(f"config.yaml could not be read ({type(exc).__name__}): the arms are shown without their "
                     "prediction settings")
        return {}
    return data if isinstance(data, dict) else {}


def _seconds(value: float) -> str:
    value = float(value)
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "-" if value is None else str(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _stage_row(span: dict, attempts: int = 1) -> dict:
    memory = span.get("memory") or {}
    return {"stage": span["stage"], "status": span["status"], "start": (span["start"] or "-").replace("T", " "),
            "duration": _seconds(span["duration_s"]), "duration_s": span["duration_s"], "attempts": attempts,
            "rss": peak_text(memory), "children_rss": peak_text(memory, "children_peak_rss_mb"),
            "gpu": peak_text(memory, "gpu_peak_mb"), "error": span.get("error") or "",
            "figures": [(k, _value(v)) for k, v in span["figures"].items()]}


def _stages(spans: list[dict]) -> list[dict]:
    """One row per stage, in the order the stages first ran: its last attempt that did the work (a stage skipped
    when the run was continued shows the attempt that made its outputs), and how many attempts there were."""
    order: dict[str, list[dict]] = {}
    for s in spans:
        if s["stage"] != "run":
            order.setdefault(s["stage"], []).append(s)
    rows = []
    for stage, tries in order.items():
        worked = [s for s in tries if s["status"] != "skipped"]
        row = _stage_row(worked[-1] if worked else tries[-1], attempts=len(worked))
        if worked and tries[-1]["status"] == "skipped":
            row["status"] = f"{worked[-1]['status']} (skipped since)"
        rows.append(row)
    return rows


def _steps(config: dict) -> list[dict]:
    """The steps a `steps:` run listed in its config.yaml (name, stage, from), [] for a `stages:` run."""
    steps = config.get("steps")
    return [s for s in steps if isinstance(s, dict) and isinstance(s.get("name"), str)] \
        if isinstance(steps, list) else []


def _trainings(run_dir: Path, config: dict, notes: list[str]) -> list[dict]:
    """Every train step's log of a `steps:` run, each with its step's name (SFT, then DPO, side by side)."""
    found = []
    for step in _steps(config):
        own = config.get(step["name"])
        if step.get("stage") == "train" and isinstance(own, dict) and isinstance(own.get("output_dir"), str):
            found.append({"name": step["name"], **_training(Path(own["output_dir"]), {}, notes, only=True)})
    return found


def log_rows(log: Path) -> list[dict]:
    """A training log's rows (trainer_log.jsonl), each with its finite numbers only; a line cut by a kill is
    skipped, the rest still reads."""
    rows = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(v)})
    return rows


def _training(run_dir: Path, config: dict, notes: list[str], only: bool = False) -> dict:
    """The training log of the run (its train section's output folder, `adapter/`, or the folder itself) as rows;
    `only`: of that folder alone."""
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    places = [Path(train["output_dir"])] if isinstance(train.get("output_dir"), str) else []
    places += [run_dir] if only else [run_dir / "adapter", run_dir]
    log = next((p / TRAIN_LOG for p in places if (p / TRAIN_LOG).is_file()), None)
    if log is None:
        return {"log": None, "rows": []}
    rows = log_rows(log)
    if not rows:
        notes.append(f"{log.name} holds no logged step")
    return {"log": str(log), "rows": rows}


def _arm_folders(run_dir: Path, spans: list[dict], config: dict) -> list[tuple[str, Path]]:
    """(arm, report folder): the run's evaluations in the order they ran (a `steps:` run's evaluate steps in
    their order), then any other under eval/; a report folder of its own (evaluate --report) is its one arm."""
    names = [s["stage"].split("_", 1)[1] for s in spans if s["stage"].startswith("evaluate_")]
    names = [s["name"] for s in _steps(config) if s.get("stage") == "evaluate"] or names
    found = sorted(p.name for p in (run_dir / "eval").iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if (run_dir / "eval").is_dir() else []
    arms = [(n, run_dir / "eval" / n) for n in dict.fromkeys(names + found)]
    if (run_dir / METRICS).is_file():
        arms.insert(0, (run_dir.name, run_dir))
    return [(name, folder) for name, folder in arms if (folder / METRICS).is_file()]


def arm_label(name: str, predict: dict) -> str:
    """The arm's name and how it predicted: `finetuned (vote over 8 samples + greedy)`."""
    if not isinstance(predict, dict):
        return name
    samples, vote = predict.get("num_samples") or 0, predict.get("vote") or "none"
    if vote != "none" and samples:
        greedy = " + greedy" if predict.get("include_greedy", True) else ""
        rows = ", rows preferred" if predict.get("prefer_rows") else ""
        return f"{name} ({vote} vote over {samples} samples{greedy}{rows})"
    if predict.get("retry_on_error"):
        return f"{name} (greedy, up to {predict['retry_on_error']} retries on error)"
    return f"{name} (greedy)" if predict.get("num_beams", 1) in (1, None) else f"{name} (beam {predict['num_beams']})"


def _arms(run_dir: Path, spans: list[dict], config: dict, notes: list[str]) -> list[dict]:
    arms = []
    source = {s["name"]: s.get("from") for s in _steps(config)}  # an evaluate step's predict step
    for name, folder in _arm_folders(run_dir, spans, config):
        try:
            metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            notes.append(f"{folder / METRICS} could not be read ({type(exc).__name__}): arm {name} left out")
            continue
        if not isinstance(metrics, dict):
            notes.append(f"{folder / METRICS} is not an evaluation's metrics: arm {name} left out")
            continue
        levels, table = level_table(metrics)
        kinds, unreadable = [], False
        try:
            for line in (folder / EXAMPLES).read_text(encoding="utf-8", errors="replace").splitlines():
                row = json.loads(line) if line.strip() else {}
                kinds.append(row.get("failure") if isinstance(row, dict) else None)
        except (OSError, ValueError):
            unreadable = True
            notes.append(f"{folder / EXAMPLES} could not be read: no failure kinds for arm {name}")
        arms.append({"name": name, "label": arm_label(name, config.get(f"predict_{name}") or
                                                           config.get(source.get(name) or "")), "folder": str(folder),
                     "levels": levels, "table": table, "ex": metrics.get("ex"), "em": metrics.get("em"),
                     "count": metrics.get("count"), "bird": isinstance(metrics.get("bird"), dict),
                     "failures": None if unreadable else failure_counts(kinds)})
    return arms


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def link(target: Path, page_dir: Path) -> str:
    """`target` as a link relative to the page's folder (the run folder can move with its page), URL-quoted."""
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(page_dir))
    return quote(rel.replace(os.sep, "/"))


def _files(run_dir: Path, page_dir: Path) -> dict:
    """The run's files, three folders deep, hidden ones (markers, locks, temporary files) and the inside of
    checkpoints left out; links relative to the page, never followed through a symbolic link."""
    entries, more = [], 0
    for top, dirs, files in os.walk(run_dir):
        here = Path(top)
        depth = len(here.relative_to(run_dir).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = [(d, True) for d in dirs if d.startswith(SKIP_INSIDE) or depth >= 2] + \
                [(f, False) for f in sorted(files) if not f.startswith(".")]
        dirs[:] = [d for d in dirs if not d.startswith(SKIP_INSIDE) and depth < 2]
        for name, is_dir in sorted(names):
            path = here / name
            if len(entries) >= MAX_FILES:
                more += 1
                continue
            size = "folder" if is_dir else _size(path.lstat().st_size)
            entries.append({"name": path.relative_to(run_dir).as_posix() + ("/" if is_dir else ""),
                            "href": link(path, page_dir), "size": size})
    return {"entries": sorted(entries, key=lambda e: e["name"]), "more": more,
            "trace": link(run_dir / TRACE_FILE, page_dir)}
