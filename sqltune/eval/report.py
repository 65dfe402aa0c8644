"""The evaluation report: metrics.json (every figure), per_example.jsonl, and report.md with the per-hardness
table and the most common kinds of failure."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from sqltune.eval.exact_match import PARTIAL_TYPES
from sqltune.io import atomic_write, write_json, write_jsonl

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
    """A short label for why an example was wrong (None when it was right on every measure taken)."""
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


def write_report(folder: Path, cfg, figures: dict, results: list[dict], table: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "metrics.json", {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                                         **figures})
    write_jsonl(folder / "per_example.jsonl", (
        {"db_id": r["db_id"], "hardness": r["hardness"], "question": r["question"], "gold": r["gold"],
         "pred": r["pred"], "ex": r["ex"], "em": r["em"], "error": r["error"] or r["gold_error"]}
        for r in results))
    kinds = Counter(k for k in (failure_kind(r) for r in results) if k)
    lines = ["# Evaluation report", "", f"- predictions: `{cfg.pred}`", f"- gold: `{cfg.gold}`",
             f"- databases: `{cfg.db_dir}`", f"- flags: etype={cfg.etype}, plug_value={cfg.plug_value}, "
             f"keep_distinct={cfg.keep_distinct}", f"- questions scored: {figures.get('count')}"
             + (f" ({figures['skipped_missing_db']} left out: database absent)" if figures.get("skipped_missing_db")
                else ""), ""]
    if "scores" in figures:
        s = figures["scores"]
        levels = ["easy", "medium", "hard", "extra", "all"]
        lines += ["| | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels),
                  "| count | " + " | ".join(str(s[lv]["count"]) for lv in levels) + " |"]
        if figures["etype"] != "match":
            lines.append("| EX | " + " | ".join(f"{s[lv]['exec']:.3f}" for lv in levels) + " |")
        if figures["etype"] != "exec":
            lines.append("| EM | " + " | ".join(f"{s[lv]['exact']:.3f}" for lv in levels) + " |")
    lines += ["", "## Most common failure kinds", "", "| kind | count |", "|---|---|"]
    lines += [f"| {kind} | {n} |" for kind, n in kinds.most_common(20)]
    lines += ["", "## Full table", "", "```", table, "```", ""]
    with atomic_write(folder / "report.md") as handle:
        handle.write("\n".join(lines))
