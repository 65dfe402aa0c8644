"""The run's page: the plots drawn from what page.py collected, the template (page.html.j2, package data) rendered
with every value escaped (Jinja's autoescape: a run name, an error or a failure kind is text, never markup), and
the file written atomically. The page is self-contained: its plots are PNGs inside it (data: addresses), its style
is in it, it runs no script and fetches nothing; its links to the run's files are relative to where it lies.

A plot that cannot be drawn (matplotlib failing, nothing to draw) leaves a line saying what is missing in its place;
`sqltune run` never fails over its page (write_run_page: a warning instead).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import atomic_write
from sqltune.report import page, plots

PAGE = "report.html"  # the page's name in a run folder
TEMPLATE = "page.html.j2"


def _version() -> str:
    """sqltune's version, from its installed metadata (importing the package `sqltune` would make an import circle:
    it imports the pipeline, which writes this page)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sqltune")
    except PackageNotFoundError:
        return "(not installed)"


def _plot(title: str, draw, empty: str) -> dict:
    """{"title", "src" (a data: address) or None, "missing": why there is no image, "failed": drawing failed}."""
    try:
        png = draw()
    except Exception as exc:  # any failure of matplotlib: the page says so and goes on
        return {"title": title, "src": None, "failed": True,
                "missing": f"the {title} plot could not be drawn ({type(exc).__name__}: {exc})"}
    if png is None:
        return {"title": title, "src": None, "missing": empty, "failed": False}
    return {"title": title, "src": plots.data_uri(png), "missing": "", "failed": False}


def _levels(arms: list[dict]) -> list[str]:
    return list(dict.fromkeys(lv for arm in arms for lv in arm["levels"]))


def _accuracy(arms: list[dict]) -> dict:
    """The side-by-side table (one row per level; per arm EX and EM, the best of a level marked) and its plot."""
    levels = _levels(arms)
    measures = [m for m in ("ex", "em") if any(a["table"].get(lv, {}).get(m) is not None for a in arms
                                               for lv in levels)]
    rows = []
    for lv in levels:
        counts = list(dict.fromkeys(a["table"][lv]["count"] for a in arms if lv in a["table"]))
        cells = []
        for arm in arms:
            for m in measures:
                value = arm["table"].get(lv, {}).get(m)
                cells.append({"value": value, "text": "-" if value is None else f"{value:.3f}", "measure": m})
        for m in measures:  # the best arm of the level on each measure is marked
            values = [c["value"] for c in cells if c["measure"] == m and c["value"] is not None]
            best = max(values) if len(set(values)) > 1 else None  # nothing marked where all arms tie
            for c in cells:
                if c["measure"] == m:
                    c["best"] = best is not None and c["value"] == best
        rows.append({"level": lv, "count": " / ".join(str(c) for c in counts), "cells": cells})
    first = arms[0]["table"] if arms else {}
    plot = _plot("EX and EM per level", lambda: plots.accuracy_by_level(
        [{"name": a["name"], **{m: {lv: a["table"].get(lv, {}).get(m) for lv in levels} for m in measures}}
         for a in arms], levels, {lv: first.get(lv, {}).get("count", "?") for lv in levels},
        "accuracy per level, every arm", tuple(measures)), "no evaluation in this run")
    return {"measures": [m.upper() for m in measures], "rows": rows, "plot": plot}


def _failures(arms: list[dict]) -> dict:
    scored = [a for a in arms if a["failures"] is not None]
    totals: dict[str, int] = {}
    for arm in scored:
        for kind, n in arm["failures"].items():
            totals[kind] = totals.get(kind, 0) + n
    kinds = sorted(totals, key=lambda k: (-totals[k], k))
    rows = [{"kind": k, "counts": [a["failures"].get(k, 0) for a in scored]} for k in kinds]
    plot = _plot("failure kinds", lambda: plots.failure_kinds([(a["name"], a["failures"]) for a in scored]),
                 "no wrong answer in any arm" if scored else "no per-example file to count failures from")
    return {"arms": [a["name"] for a in scored], "rows": rows, "plot": plot}


def _step_training(found: dict, page_dir: Path) -> dict:
    """One train step's log and curves, titled with its step's name."""
    rows, name = found["rows"], found["name"]
    return {"name": name, "log": found["log"] and page.link(Path(found["log"]), page_dir), "steps": len(rows),
            "loss": _plot(f"{name} training loss", lambda: plots.training_loss(rows),
                          "no loss in the training log" if rows else f"no training log in step {name}'s folder"),
            "reward": _plot(f"{name} reward", lambda: plots.reward_curve(rows), "")}


def render(run_dir: Path, page_dir: Path) -> str:
    """The page's HTML for the run folder `run_dir`, its links relative to `page_dir`."""
    from jinja2 import Environment, StrictUndefined

    data = page.collect(run_dir, page_dir)
    rows = data["training"]["rows"]
    training = {"log": data["training"]["log"] and page.link(Path(data["training"]["log"]), page_dir),
                "steps": len(rows),
                "loss": _plot("training loss", lambda: plots.training_loss(rows),
                              "no loss in the training log" if rows else "no training log in this folder"),
                "reward": _plot("reward", lambda: plots.reward_curve(rows), "")}
    trainings = [_step_training(t, page_dir) for t in data["trainings"]]
    if trainings:  # a `steps:` run: every train step's curves, under its step's name
        training = {"log": None, "steps": 0, "loss": {"src": None, "missing": "", "failed": False, "title": ""},
                    "reward": {"src": None, "missing": "", "failed": False, "title": ""}}
    accuracy, failures = _accuracy(data["arms"]), _failures(data["arms"])
    plotted = [training["loss"], training["reward"], accuracy["plot"], failures["plot"]] + \
        [p for t in trainings for p in (t["loss"], t["reward"])]
    missing = [p["missing"] for p in plotted if p["failed"]]  # drawing failures (absent data is said in its section)
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(resources.files("sqltune.report").joinpath(TEMPLATE).read_text(encoding="utf-8"))
    return template.render({**data, "training": training, "trainings": trainings, "accuracy": accuracy, "failures": failures,
                            "missing": missing + data["notes"], "version": _version()})


def write_page(run_dir: Path, out: Path) -> Path:
    """Write the page of `run_dir` to `out` (replaced as a whole, never written through a link); returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if out.is_dir() and not out.is_symlink():
        raise SqltuneError(f"--html {out} is a folder; give the page's file name (e.g. {out / PAGE})")
    html = render(run_dir, out.parent)
    with atomic_write(out) as handle:
        handle.write(html)
    return out


def write_run_page(run_dir: Path) -> Path | None:
    """`report.html` in a run folder at the end of `sqltune run`; any failure is one warning line, never a failed
    run (the stages' work is done and recorded)."""
    try:
        return write_page(run_dir, run_dir / PAGE)
    except Exception as exc:
        print(f"sqltune: warning: could not write the run's page {run_dir / PAGE}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return None
