"""The evaluation report: metrics.json (every figure), per_example.jsonl, report.md with the per-hardness
table and the most common kinds of failure, and its plots: accuracy.png (EX and EM per level) and failures.png
(the failure kinds). A plot that cannot be drawn is named in report.md; the report is written all the same.

The folder is written whole beside its place and swapped in as one unit, so a failure (a full disk) leaves the old
report as it was, never new metrics beside old examples. Only a report folder is replaced: a folder holding other
files, a symbolic link or a file at that path is refused.

One writer per report: writing holds `<report>.lock` beside the folder (an evaluate finishing while another writes
the same report waits up to REPORT_WAIT_S for it, then gets one line naming the holder). So the temporary folders
beside it that a killed evaluate left (`.<report>.report-*`, and `.<report>.old-*` from a swap cut short) are stale,
and are removed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections import Counter
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.eval.exact_match import PARTIAL_TYPES
from sqltune.eval.scores import LEVELS
from sqltune.io import atomic_write, swap_in, temp_dir, write_json, write_jsonl
from sqltune.lock import acquire, release

PLOTS = {"accuracy.png": "EX and EM per level", "failures.png": "failure kinds"}  # file: what it shows
_EMPTY = {"accuracy.png": "no level was scored", "failures.png": "no wrong answer"}
REPORT_FILES = ("metrics.json", "per_example.jsonl", "report.md", "trace.jsonl", *PLOTS)  # what a report folder holds
REPORT_WAIT_S = 60.0  # how long writing a report waits for another evaluate writing the same one

_NAMES = re.compile(r":\s.*$")
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")


def error_kind(message: str) -> str:
    """`OperationalError: no such column: T3.x` -> `no such column`; `near "The": syntax error` -> `syntax error`."""
    text = message.split(": ", 1)[-1] if message.split(": ", 1)[0].endswith(("Error", "Warning")) else message
    if "syntax error" in text:
        return "syntax error"
    if text.startswith("incomplete input"):
        return "incomplete input"
    return _QUOTED.sub("…", _NAMES.sub("", text)).strip()[:60]


def failure_kind(r: dict) -> str | None:
    """A short label for why an example was wrong, by its first failure: EX, then EM (None when it was right on
    every measure taken, or was not scored). So each wrong answer has exactly one label."""
    if r.get("left_out"):
        return None
    if r.get("gold_error"):
        return "gold query failed"
    if r["error"] == "empty prediction":
        return "empty prediction"
    if r.get("ex") == 0:
        err = r.get("error")
        if err and not err.startswith("does not parse"):
            if "timed out" in err:
                return "execution: timed out"
            if err.startswith("more than"):
                return "execution: too many rows"
            if err.startswith("result too large"):
                return "execution: result too large"
            if err.startswith("write refused"):
                return "write refused: databases are read-only"
            if err.startswith("refused:"):
                return err.split(" (")[0]
            if err.startswith("database unreadable"):
                return "database unreadable"
            return "execution error: " + error_kind(err)
        return "wrong result"
    if r.get("em") == 0:
        if r.get("error", "") and r["error"].startswith("does not parse"):
            return "exact match: prediction outside the Spider grammar"
        partial = r.get("partial") or {}
        for t in PARTIAL_TYPES:
            if t in partial and partial[t]["f1"] != 1:
                return f"exact match: {t} differs"
        return "exact match: FROM tables differ"
    return None


def level_table(figures: dict) -> tuple[list[str], dict]:
    """An evaluation's figures per level, from its metrics: the levels in order and {level: {"count", "ex", "em"}}
    (Spider's hardness, with joint_all for multi-turn files; BIRD's difficulties and total when scored by BIRD's
    rules). A measure not taken, or a level without questions, is None."""
    if isinstance(figures.get("bird"), dict):
        table = figures["bird"]
        levels = [lv for lv in ("simple", "moderate", "challenging", "total") if isinstance(table.get(lv), dict)]
        return levels, {lv: {"count": table[lv].get("count"), "ex": table[lv].get("exec") if table[lv].get("count")
                             else None, "em": None} for lv in levels}
    scores = figures.get("scores") if isinstance(figures.get("scores"), dict) else {}
    levels = [lv for lv in (*LEVELS, "joint_all") if isinstance(scores.get(lv), dict)]
    etype = figures.get("etype", "all")
    out = {}
    for lv in levels:
        s = scores[lv]
        out[lv] = {"count": s.get("count"),
                   "ex": s.get("exec") if etype != "match" and s.get("count") else None,
                   "em": s.get("exact") if etype != "exec" and s.get("em_count", s.get("count")) else None}
    return levels, out


def failure_counts(kinds: list[str | None]) -> dict[str, int]:
    """How many answers of each failure kind (None: right, or not scored), the most common first; failed gold
    queries are not the model's failures and are left out, as in report.md's table."""
    counts = Counter(k for k in kinds if k and k != "gold query failed")
    return dict(counts.most_common())


def _failure_lines(results: list[dict], etype: str) -> list[str]:
    """The failure table: each question once, under its first failure; gold failures apart (not the model's)."""
    kinds = {r["index"]: failure_kind(r) for r in results}
    wrong = [r for r in results if kinds[r["index"]] and not r.get("gold_error")]
    n_ex = sum(1 for r in wrong if r.get("ex") == 0)
    parts = [f"{n_ex} wrong in EX"] if etype != "match" else []
    if etype != "exec":
        parts.append(f"{len(wrong) - n_ex} right in EX but not exact match" if etype == "all"
                     else f"{len(wrong)} not exact match")
    lines = [f"Each question is counted once, under its first failure (EX, then EM): {', '.join(parts)}; "
             f"{len(wrong)} in all."]
    n_gold = sum(1 for r in results if r.get("gold_error"))
    if n_gold:
        lines.append(f"Gold queries that failed or did not parse (not the prediction's fault): {n_gold}.")
    counts = Counter(kinds[r["index"]] for r in wrong)
    return lines + ["", "| kind | count |", "|---|---|"] + [f"| {k} | {n} |" for k, n in counts.most_common()]


def check_report_folder(folder: Path) -> None:
    """One line unless `folder` is absent or a report folder (only report files in it): the whole folder is
    replaced, so nothing else may live there, and a link is never followed."""
    if folder.is_symlink():
        raise SqltuneError(f"--report {folder} is a symbolic link: the report folder is replaced as a whole and never "
                           "written through a link; choose another --report")
    if folder.exists() and not folder.is_dir():
        raise SqltuneError(f"--report {folder} is a file; give a folder for the report")
    others = sorted(p.name for p in folder.iterdir() if p.name not in REPORT_FILES) if folder.is_dir() else []
    if others:
        raise SqltuneError(f"--report {folder} holds files that are not a report ({', '.join(others[:3])}"
                           f"{' and more' if len(others) > 3 else ''}): the report replaces the whole folder; "
                           "choose a new or empty folder")


def temp_names(folder: Path) -> re.Pattern:
    """The names of the temporary folders a report write makes beside `folder`: its own (`.<name>.report-`) and
    swap_in's old-folder (`.<name>.old-`), each with mkdtemp's 8 characters (so another report's are not matched)."""
    name = re.escape(f".{folder.name}.")
    return re.compile(name + r"(report|old)-[a-z0-9_]{8}")


def clear_stale(folder: Path) -> None:
    """Remove the temporary folders a killed write of this report left beside it (the caller holds the lock)."""
    names = temp_names(folder)
    for path in folder.parent.iterdir() if folder.parent.is_dir() else []:
        if names.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _lock(folder: Path) -> int:
    """Hold `<report>.lock`, waiting up to REPORT_WAIT_S while another evaluate writes the same report."""
    path = folder.with_name(folder.name + ".lock")
    busy = f"another evaluate is writing the report {folder}"
    deadline = time.monotonic() + REPORT_WAIT_S
    while True:
        try:
            return acquire(path, busy, "wait for it to finish or choose another --report")
        except SqltuneError as exc:
            if not str(exc).startswith(busy) or time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


def write_report(folder: Path, cfg, figures: dict, results: list[dict], table: str) -> None:
    """Write the report into a fresh folder beside `folder`, then swap it in (the trace of earlier commands there
    comes along, copied, never through a link); the temporary folders a killed write of it left go first."""
    check_report_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(folder)
    try:
        clear_stale(folder)
        _write(folder, cfg, figures, results, table)
    finally:
        release(lock, folder.with_name(folder.name + ".lock"))


def _write(folder: Path, cfg, figures: dict, results: list[dict], table: str) -> None:
    tmp = temp_dir(folder.parent, f".{folder.name}.report-")
    try:
        write_json(tmp / "metrics.json", {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                                          **figures})
        write_jsonl(tmp / "per_example.jsonl", (
            {"index": r["index"], "interaction": r["interaction"], "turn": r["turn"], "db_id": r["db_id"],
             "hardness": r["hardness"], "question": r["question"], "gold": r["gold"], "pred": r["pred"],
             "ex": r["ex"], "em": r["em"], "error": r["error"] or r["gold_error"] or r.get("left_out"),
             "gold_unparsed": r.get("gold_unparsed"),
             "failure": failure_kind(r)} for r in results))
        missing = write_plots(tmp, cfg, figures, results)
        with atomic_write(tmp / "report.md") as handle:
            handle.write(report_text(cfg, figures, results, table, missing))
        trace = folder / "trace.jsonl"
        if stat.S_ISREG(os.lstat(trace).st_mode if os.path.lexists(trace) else 0):
            shutil.copyfile(trace, tmp / "trace.jsonl", follow_symlinks=False)
        swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_plots(folder: Path, cfg, figures: dict, results: list[dict]) -> dict[str, str]:
    """accuracy.png and failures.png into the report folder being written; returns {plot: why it is missing} for
    each one not drawn (nothing to draw, or the drawing failed: evaluation's figures never depend on a plot)."""
    from sqltune.report import plots

    levels, table = level_table(figures)
    name = Path(cfg.pred).stem or "predictions"
    draw = {"accuracy.png": lambda: plots.accuracy_by_level(
                [{"name": name, "ex": {lv: table[lv]["ex"] for lv in levels},
                  "em": {lv: table[lv]["em"] for lv in levels}}], levels,
                {lv: table[lv]["count"] for lv in levels}, f"{name}: accuracy per level"),
            "failures.png": lambda: plots.failure_kinds([(name, failure_counts([failure_kind(r) for r in results]))])}
    missing = {}
    for file, make in draw.items():
        try:
            png = make()
        except Exception as exc:  # matplotlib absent or failing: the report goes on without this plot
            missing[file] = f"could not be drawn ({type(exc).__name__}: {exc})"
            continue
        if png is None:
            missing[file] = f"nothing to plot: {_EMPTY[file]}"
            continue
        with atomic_write(folder / file, "wb") as handle:
            handle.write(png)
    return missing


def report_text(cfg, figures: dict, results: list[dict], table: str, missing: dict | None = None) -> str:
    """report.md: the inputs and flags, what was scored, the per-hardness table, the plots and the failure
    kinds."""
    accounted = f"- questions: {figures.get('count')} scored"
    if figures.get("total") and figures.get("considered", figures["total"]) < figures["total"]:
        accounted += f" of the first {figures['considered']} (--max_samples) of {figures['total']} in the gold file"
    if figures.get("skipped_missing_db"):
        accounted += (f"; {figures['skipped_missing_db']} left out: database absent or unreadable "
                      f"({', '.join(figures.get('left_out_db', []))})")
    if figures.get("gold_unparsed"):
        accounted += f"; {figures['gold_unparsed']} not scored: gold query does not parse"
    lines = ["# Evaluation report", "", f"- predictions: `{cfg.pred}`", f"- gold: `{cfg.gold}`",
             f"- databases: `{cfg.db_dir}`", f"- flags: etype={cfg.etype}, plug_value={cfg.plug_value}, "
             f"keep_distinct={cfg.keep_distinct}", accounted]
    if figures.get("history"):
        lines.append(f"- history: {figures['history']} (the prompts' history mode, from the prediction's meta file)")
    if figures.get("unreadable_db"):
        lines.append(f"- unusable database files: {', '.join(figures['unreadable_db'])} (their questions "
                     + ("are left out)" if cfg.skip_missing_db else "count wrong in EX)"))
    if figures.get("prefix_note"):
        lines.append(f"- {figures['prefix_note'].removeprefix('note: ')}")
    lines.append("")
    if "scores" in figures:
        s = figures["scores"]
        levels = ["easy", "medium", "hard", "extra", "all"]
        lines += ["| | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels),
                  "| count | " + " | ".join(str(s[lv]["count"]) for lv in levels) + " |"]
        if figures["etype"] != "match":
            lines.append("| EX | " + " | ".join(f"{s[lv]['exec']:.3f}" for lv in levels) + " |")
        if figures["etype"] != "exec":
            lines.append("| EM | " + " | ".join(f"{s[lv]['exact']:.3f}" for lv in levels) + " |")
    if "question_match" in figures:
        lines.append("")
        for key, name, unit in (("question_match", "question match (turn level)", "questions"),
                                ("interaction_match", "interaction match (every turn right)", "interactions")):
            m = figures[key]
            cells = ", ".join(f"{k.upper()} {m[k]:.3f}" for k in ("ex", "em") if m[k] is not None)
            lines.append(f"- {name}: {cells} over {m['count']} {unit}")
    lines += ["", "## Plots", ""]  # files beside this one
    for file, what in PLOTS.items():
        why = (missing or {}).get(file)
        lines += [f"{what}: not drawn, {why}." if why else f"![{what}]({file})", ""]
    lines += ["## Most common failure kinds", ""] + _failure_lines(results, cfg.etype)
    lines += ["", "## Full table", "", "```", table, "```", ""]
    if "scores" in figures and figures["etype"] != "exec":
        lines += ["Partial matching: F1 is 1.000 where accuracy and recall are both 0.000 (no question at that level "
                  "has the component): the official script's convention, kept so the figures compare.", ""]
    return "\n".join(lines)
