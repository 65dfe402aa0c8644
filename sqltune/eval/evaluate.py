"""The evaluate stage: prediction file + gold file -> Spider EX and EM per hardness (or BIRD EX per difficulty),
equal to the official scripts.

Files are read and lined up in files.py, databases checked in databases.py; each question is scored by
scoring.py inside the sandbox's worker processes (sqltune.sandbox), grouped by database so that gold results and
connections are reused. Every query, and every step between queries, ends within --timeout plus a second: the
worker running it is killed and replaced, and the question counts wrong with the reason. Ctrl-C or SIGTERM kills
the workers at once.

Rules of our own, so that one bad line or database never aborts or skews a run:
- a database file that exists but cannot be used is named once; its questions count wrong in EX ("database
  unreadable") and their EM still comes from tables.json. With --skip_missing_db they are left out and counted,
  exactly like questions whose database file is absent (which stop the run without that flag: a wrong --db_dir
  is the usual cause);
- EX counts every question: a gold query the exact-match parser cannot read is executed and scored; EM says how
  many questions it could not score;
- multi-turn files also give question match and interaction match (multiturn.py), for EX and EM.
"""

from __future__ import annotations

import sys
from pathlib import Path


from sqltune.config import EvalConfig
from sqltune.errors import SqltuneError
from sqltune.eval.bird import bird_figures, format_bird
from sqltune.eval.databases import check_databases
from sqltune.eval.exact_match import foreign_key_map
from sqltune.eval.files import Pair, read_meta, read_pairs
from sqltune.eval.multiturn import format_matches, match_figures
from sqltune.eval.scores import aggregate, format_table
from sqltune.eval.scoring import UNKNOWN, blank_result, failed_result, init_worker, score_pair
from sqltune.progress import Progress
from sqltune.sandbox import MB, Limits, Sandbox, default_workers


def sandbox_limits(cfg: EvalConfig) -> Limits:
    return Limits(timeout=cfg.timeout, max_rows=cfg.max_rows, max_bytes=int(cfg.max_result_mb * MB),
                  memory_bytes=int(cfg.max_memory_mb) * MB)


def score_all(pairs: list[Pair], cfg: EvalConfig, kmaps: dict, tables: dict, unreadable: dict) -> list[dict]:
    """Every pair scored in the sandbox's workers (never more than the cores or the databases), in order."""
    if not pairs:
        return []
    workers = default_workers(cfg.workers, len({p.db_id for p in pairs}))
    bar = Progress(len(pairs), "evaluate", "q", quiet=cfg.quiet or len(pairs) < 50, leave=False)  # few: seconds
    try:
        with Sandbox(workers, sandbox_limits(cfg), (init_worker, (cfg, kmaps, tables, unreadable))) as sandbox:
            results = sandbox.map(score_pair, pairs, key=lambda p: p.db_id, progress=bar.update,
                                  on_fail=lambda pair, reason, phase, step: failed_result(cfg, pair, reason, phase,
                                                                                         step))
    finally:
        bar.close()
    return results


def load_tables(path: str) -> tuple[dict, dict]:
    """(db_id -> foreign-key map, db_id -> tables.json entry)."""
    if not path:
        return {}, {}
    from sqltune.data.sources.common import read_tables

    tables = read_tables(Path(path))
    return {db_id: foreign_key_map(e) for db_id, e in tables.items()}, tables


def _questions_path(cfg: EvalConfig, meta: dict) -> str:
    """--questions, else the prepared records predict answered (named in its meta file), when they exist."""
    if cfg.questions:
        return cfg.questions
    file = (meta.get("about") or {}).get("file") or meta.get("file")
    return file if isinstance(file, str) and file.endswith(".jsonl") and Path(file).is_file() else ""


def _check_inputs(cfg: EvalConfig) -> None:
    if not cfg.db_dir or not Path(cfg.db_dir).is_dir():
        raise SqltuneError(f"database folder not found: {cfg.db_dir or '(none given; use --db_dir)'}")
    if cfg.etype in ("all", "match") and not cfg.tables and not cfg.bird:
        raise SqltuneError("--tables (tables.json) is needed for exact match; or use --etype exec")
    if cfg.report:
        from sqltune.eval.report import check_report_folder

        check_report_folder(Path(cfg.report))  # refused before the scoring, not after it


def _figures(scored: list[dict], cfg: EvalConfig, multi_turn: bool) -> tuple[dict, str]:
    if cfg.bird:
        figures = bird_figures(scored)
        return figures, format_bird(figures)
    scores = aggregate(scored, multi_turn, cfg.etype)
    figures = {"scores": scores, "multi_turn": multi_turn, "etype": cfg.etype}
    table = format_table(scores, cfg.etype, multi_turn)
    figures["ex"] = scores["all"]["exec"] if cfg.etype != "match" else None
    figures["em"] = scores["all"]["exact"] if cfg.etype != "exec" else None
    n_unknown = sum(1 for r in scored if r["hardness"] == UNKNOWN)
    if n_unknown and cfg.etype != "exec":
        table += (f"\nnote: {n_unknown} questions have a gold query the exact-match parser cannot read: EX counts "
                  f"them (in `all`), EM could not score them (EM is over {scores['all']['em_count']})")
    if multi_turn:
        figures["question_match"], figures["interaction_match"] = match_figures(scores, cfg.etype)
        table += "\n\n" + format_matches(figures["question_match"], figures["interaction_match"])
    return figures, table


def evaluate(cfg: EvalConfig) -> dict:
    """Score the predictions; print the official-style table; write the report if asked. Returns the figures."""
    meta = read_meta(cfg.pred) if cfg.pred else {}
    questions_path = _questions_path(cfg, meta)
    try:
        pairs, multi_turn, note, n_all = read_pairs(cfg, questions_path)
    except SqltuneError:
        if questions_path == cfg.questions:
            raise
        pairs, multi_turn, note, n_all = read_pairs(cfg)  # records named by the meta file that do not line up
    _check_inputs(cfg)
    kmaps, tables = load_tables(cfg.tables)
    absent, unreadable, notices = check_databases(cfg.db_dir, {p.db_id for p in pairs})
    absent = {db for db in absent if cfg.etype != "match" or db not in tables}  # matching needs only the schema
    if absent and not cfg.skip_missing_db:
        n_missing = sum(p.db_id in absent for p in pairs)
        raise SqltuneError(f"{n_missing} questions use databases absent from {cfg.db_dir}: {', '.join(sorted(absent))}"
                           " (pass --skip_missing_db to leave them out)")
    left_out = absent | (set(unreadable) if cfg.skip_missing_db else set())
    results = score_all([p for p in pairs if p.db_id not in left_out], cfg, kmaps, tables, unreadable)
    for p in pairs:
        if p.db_id in left_out:
            why = f"database unreadable: {unreadable[p.db_id]}" if p.db_id in unreadable else "database absent"
            results.append({**blank_result(p), "left_out": f"left out (--skip_missing_db): {why}"})
    results.sort(key=lambda r: r["index"])
    scored = [r for r in results if r["hardness"] is not None]
    history = meta.get("history") if isinstance(meta.get("history"), str) else None
    figures, table = _figures(scored, cfg, multi_turn)
    if history:
        table = f"history: {history} (from {Path(cfg.pred).name}.meta.json)\n" + table
    n_left_out = sum(1 for r in results if r.get("left_out"))
    figures.update(count=len(scored), total=n_all, considered=len(pairs), skipped_missing_db=n_left_out,
                   left_out_db=sorted(left_out), unreadable_db=sorted(unreadable), history=history, prefix_note=note,
                   gold_unparsed=sum(1 for r in scored if r["hardness"] == UNKNOWN),
                   em_unscored=sum(1 for r in scored if r["em"] is None and cfg.etype != "exec" and not cfg.bird),
                   gold_failed=sum(1 for r in scored if r["gold_error"] and r["hardness"] != UNKNOWN))
    if not cfg.quiet and cfg.table:
        print(table)
    for line in _warnings(results, unreadable, notices, note, cfg.skip_missing_db, cfg.quiet or not cfg.table):
        print(line, file=sys.stderr)
    if cfg.report:
        from sqltune.eval.report import write_report

        write_report(Path(cfg.report), cfg, figures, results, table)
    out = {"ex": figures.get("ex"), "em": figures.get("em"), "count": figures["count"],
           "skipped_missing_db": n_left_out, "details": figures}
    if "question_match" in figures:
        out.update(question_match=figures["question_match"], interaction_match=figures["interaction_match"])
    return out


_BROKEN_FILE = ("database disk image is malformed", "file is not a database", "database unreadable")


def _warnings(results: list[dict], unreadable: dict, notices: list[str], note: str, skip: bool,
              quiet: bool) -> list[str]:
    """Each unusable or damaged database once, and how many golds EM could not read (even when quiet); then each
    failing gold query on a sound database, and what was left out."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r["db_id"]] = counts.get(r["db_id"], 0) + 1
    lines = [f"warning: database {db} is unusable ({why}): its {counts.get(db, 0)} questions "
             + ("are left out" if skip else "count wrong in EX") for db, why in sorted(unreadable.items())]
    lines += notices
    unparsed = sum(1 for r in results if r["hardness"] == UNKNOWN and r["em"] is None and not r.get("left_out"))
    if unparsed:
        lines.append(f"warning: {unparsed} gold queries cannot be read by the exact-match parser: they are scored "
                     "in EX, not in EM")
    broken: dict[str, list[str]] = {}  # db_id -> gold errors that say the file itself is damaged
    for r in results:
        if r["gold_error"] and any(sign in r["gold_error"] for sign in _BROKEN_FILE):
            broken.setdefault(r["db_id"], []).append(r["gold_error"])
    lines += [f"warning: database {db} is damaged ({errors[0].split(': ', 1)[-1]}): {len(errors)} questions' gold "
              "queries fail on it and count wrong in EX" for db, errors in sorted(broken.items())]
    if quiet:
        return lines
    lines += [f"warning: question {r['index'] + 1} ({r['db_id']}): {r['gold_error']}" for r in results
              if r["gold_error"] and r["db_id"] not in broken]
    n_absent = sum(1 for r in results if r.get("left_out") and r["db_id"] not in unreadable)
    if n_absent:
        lines.append(f"note: {n_absent} questions on absent databases were left out")
    if note:
        lines.append(note)
    return lines
