"""The evaluate stage: prediction file + gold file -> Spider EX and EM per hardness, equal to the official script.

Inputs line up by line: the gold file holds `SQL<TAB>db_id` per line (a blank line separates interactions for
SParC/CoSQL), the prediction file one SQL per line. Examples are grouped by database and scored in parallel
worker processes; gold results are computed once per (database file, query).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sqltune.config import EvalConfig
from sqltune.errors import SqltuneError
from sqltune.io import database_path
from sqltune.eval.exact_match import exact_match, foreign_key_map, normalise
from sqltune.eval.execution import Executor
from sqltune.eval.hardness import hardness
from sqltune.eval.parse import Schema, empty_sql, parse_sql
from sqltune.eval.scores import aggregate, format_table


@dataclass
class Pair:
    index: int
    interaction: int
    turn: int
    db_id: str
    gold: str
    pred: str
    question: str = ""
    difficulty: str = ""


# ------------------------------------------------------------------------------------------- reading
def split_blocks(lines: list[str]) -> list[list[tuple[int, str]]]:
    """Non-blank (line number, line) runs; blank lines separate interactions (several in a row count once)."""
    blocks: list[list[tuple[int, str]]] = [[]]
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            blocks[-1].append((lineno, line))
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def read_gold(path: str) -> tuple[list[list[tuple[str, str]]], bool]:
    """Interactions of (SQL, db_id); True when the file has several interactions (blank-line separated)."""
    if not path or not Path(path).is_file():
        raise SqltuneError(f"gold file not found: {path or '(none given; use --gold)'}")
    blocks = []
    for block in split_blocks(Path(path).read_text(encoding="utf-8").splitlines()):
        pairs = []
        for lineno, line in block:
            parts = line.strip().split("\t")
            if len(parts) != 2 or not parts[1].strip():
                raise SqltuneError(f"{path} line {lineno}: expected `SQL<TAB>db_id`, got {line.strip()[:80]!r}")
            pairs.append((parts[0], parts[1].strip()))
        blocks.append(pairs)
    if not blocks:
        raise SqltuneError(f"gold file {path} is empty")
    return blocks, len(blocks) > 1


def _clean_pred(line: str, db_id: str) -> str:
    """One prediction line: a trailing `<TAB>db_id` is dropped, other tabs become spaces."""
    text = line.strip()
    if "\t" in text:
        head, _, tail = text.rpartition("\t")
        text = head if tail.strip() == db_id else text
        text = text.replace("\t", " ").strip()
    return text


def read_pairs(cfg: EvalConfig) -> tuple[list[Pair], bool]:
    blocks, multi_turn = read_gold(cfg.gold)
    if not cfg.pred or not Path(cfg.pred).is_file():
        raise SqltuneError(f"prediction file not found: {cfg.pred or '(none given; use --pred)'}")
    lines = Path(cfg.pred).read_text(encoding="utf-8", errors="replace").splitlines()
    n_gold = sum(len(b) for b in blocks)
    if multi_turn:
        pred_blocks = [[line for _, line in block] for block in split_blocks(lines)]
        if len(pred_blocks) != len(blocks):
            raise SqltuneError(f"{cfg.pred} has {len(pred_blocks)} interactions (blank-line separated) but "
                               f"{cfg.gold} has {len(blocks)}")
        for n, (pb, gb) in enumerate(zip(pred_blocks, blocks), 1):
            if len(pb) != len(gb):
                raise SqltuneError(f"interaction {n}: {cfg.pred} has {len(pb)} lines, {cfg.gold} has {len(gb)}")
    else:
        while len(lines) > n_gold and not lines[-1].strip():
            lines.pop()
        if len(lines) != n_gold:
            raise SqltuneError(f"{cfg.pred} has {len(lines)} lines but {cfg.gold} has {n_gold}: "
                               "predictions and gold must line up one to one")
        pred_blocks = [lines]
    questions = read_questions(cfg.questions, n_gold) if cfg.questions else [""] * n_gold
    difficulties = read_lines(cfg.difficulty, n_gold, "difficulty") if cfg.difficulty else [""] * n_gold
    pairs = []
    for i, (gb, pb) in enumerate(zip(blocks, pred_blocks)):
        for turn, ((gold, db_id), pred) in enumerate(zip(gb, pb)):
            k = len(pairs)
            pairs.append(Pair(k, i, turn, db_id, gold, _clean_pred(pred, db_id), questions[k], difficulties[k]))
    return pairs, multi_turn


def read_lines(path: str, expected: int, what: str) -> list[str]:
    if not Path(path).is_file():
        raise SqltuneError(f"{what} file not found: {path}")
    lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    if len(lines) != expected:
        raise SqltuneError(f"{path} has {len(lines)} lines but the gold file has {expected}")
    return lines


def read_questions(path: str, expected: int) -> list[str]:
    """Questions for the report, from prepared JSONL records or a Spider-style JSON list."""
    from sqltune.data.prompts import question_of
    from sqltune.io import read_json, read_jsonl

    if path.endswith(".jsonl"):
        rows = [question_of(r) for r in read_jsonl(path)]
    else:
        rows = [r.get("question", "") for r in read_json(path)]
    if len(rows) != expected:
        raise SqltuneError(f"{path} has {len(rows)} questions but the gold file has {expected}")
    return rows


# ------------------------------------------------------------------------------------------- scoring
_STATE: dict = {}


def _init_worker(cfg: EvalConfig, kmaps: dict, tables: dict) -> None:
    _STATE.clear()
    _STATE.update(cfg=cfg, kmaps=kmaps, tables=tables, executor=Executor(cfg.timeout, cfg.max_rows), schemas={})


def _schema(db_id: str, db_path: Path) -> Schema:
    schemas = _STATE["schemas"]
    if db_id not in schemas:
        if db_path.is_file():
            schemas[db_id] = Schema.from_sqlite(db_path)
        elif db_id in _STATE["tables"]:
            schemas[db_id] = Schema.from_tables_entry(_STATE["tables"][db_id])
        else:
            raise SqltuneError(f"database {db_id!r}: no file {db_path} and no entry in the tables file")
    return schemas[db_id]


def score_pair(pair: Pair) -> dict:
    """Hardness, EX and EM of one prediction; errors are recorded, never raised."""
    cfg: EvalConfig = _STATE["cfg"]
    db_path = database_path(cfg.db_dir, pair.db_id)
    out = {"index": pair.index, "interaction": pair.interaction, "turn": pair.turn, "db_id": pair.db_id,
           "question": pair.question, "gold": pair.gold, "pred": pair.pred, "hardness": None, "ex": None,
           "em": None, "error": None, "gold_error": None, "partial": None, "difficulty": pair.difficulty}
    pred = pair.pred.replace("value", "1")  # official rule: a `value` placeholder becomes 1
    if cfg.bird:
        return _score_bird(out, pred, db_path)
    schema = _schema(pair.db_id, db_path)
    try:
        gold_tree = parse_sql(pair.gold, schema)
    except Exception as exc:  # noqa: BLE001
        out["gold_error"] = f"gold query does not parse: {exc}"
        return out
    out["hardness"] = hardness(gold_tree)
    parse_error = None
    try:
        pred_tree = parse_sql(pred, schema)
    except Exception as exc:  # noqa: BLE001 - the official scores an unparseable prediction as the empty query
        pred_tree = empty_sql()
        parse_error = f"does not parse: {exc}"
    if cfg.etype in ("all", "exec"):
        if db_path.is_file():
            ex, error, gold_error = _STATE["executor"].exec_match(db_path, pred, pair.gold, cfg.plug_value,
                                                                   cfg.keep_distinct)
            out["ex"], out["error"], out["gold_error"] = ex, error, gold_error
        else:
            out["ex"], out["error"] = 0, f"database file not found: {db_path}"
    if cfg.etype in ("all", "match"):
        kmap = _STATE["kmaps"].get(pair.db_id, {})
        em, partial = exact_match(normalise(pred_tree, schema, kmap), normalise(gold_tree, schema, kmap))
        out["em"], out["partial"] = int(em), partial
        if parse_error and not out["error"]:
            out["error"] = parse_error
    if not pred.strip():
        out["error"] = "empty prediction"
    return out


def _score_bird(out: dict, pred: str, db_path: Path) -> dict:
    """BIRD EX: the two results compared as sets of rows."""
    out["hardness"] = out["difficulty"] or "all"
    ex = _STATE["executor"]
    try:
        gold_rows = ex.gold_result(db_path, out["gold"])
        if isinstance(gold_rows, Exception):
            out["gold_error"] = str(gold_rows)
            return out
        out["ex"] = int(set(ex.run(db_path, pred)) == set(gold_rows))
    except Exception as exc:  # noqa: BLE001
        out["ex"], out["error"] = 0, str(exc)
    return out


def _score_chunk(pairs: list[Pair]) -> list[dict]:
    return [score_pair(p) for p in pairs]


def _chunks(pairs: list[Pair], size: int) -> list[list[Pair]]:
    """Pairs grouped by database (so gold results and connections are reused), cut into chunks."""
    by_db: dict[str, list[Pair]] = {}
    for p in pairs:
        by_db.setdefault(p.db_id, []).append(p)
    chunks = []
    for group in by_db.values():
        chunks.extend(group[i:i + size] for i in range(0, len(group), size))
    return sorted(chunks, key=len, reverse=True)


def score_all(pairs: list[Pair], cfg: EvalConfig, kmaps: dict, tables: dict) -> list[dict]:
    workers = cfg.workers or os.cpu_count() or 1
    results: list[dict] = []
    bar = tqdm(total=len(pairs), desc="evaluate", unit="q", disable=cfg.quiet or len(pairs) < 50, leave=False)
    if workers <= 1 or len(pairs) < 64:
        _init_worker(cfg, kmaps, tables)
        try:
            for chunk in _chunks(pairs, 64):
                results.extend(_score_chunk(chunk))
                bar.update(len(chunk))
        finally:
            _STATE["executor"].close()
    else:
        # fork is fastest, but not after torch has started its thread pools (in `sqltune run`): then spawn
        context = multiprocessing.get_context("spawn" if "torch" in sys.modules else "fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(cfg, kmaps, tables)) as pool:
            for chunk_results in pool.map(_score_chunk, _chunks(pairs, 32)):
                results.extend(chunk_results)
                bar.update(len(chunk_results))
    bar.close()
    return sorted(results, key=lambda r: r["index"])


def load_tables(path: str) -> tuple[dict, dict]:
    """(db_id -> foreign-key map, db_id -> tables.json entry)."""
    if not path:
        return {}, {}
    from sqltune.data.sources.common import read_tables

    tables = read_tables(Path(path))
    return {db_id: foreign_key_map(e) for db_id, e in tables.items()}, tables


def evaluate(cfg: EvalConfig) -> dict:
    """Score the predictions; print the official-style table; write the report if asked. Returns the figures."""
    pairs, multi_turn = read_pairs(cfg)
    if not cfg.db_dir or not Path(cfg.db_dir).is_dir():
        raise SqltuneError(f"database folder not found: {cfg.db_dir or '(none given; use --db_dir)'}")
    if cfg.etype in ("all", "match") and not cfg.tables and not cfg.bird:
        raise SqltuneError("--tables (tables.json) is needed for exact match; or use --etype exec")
    kmaps, tables = load_tables(cfg.tables)
    missing = sorted({p.db_id for p in pairs if not database_path(cfg.db_dir, p.db_id).is_file()
                      and (cfg.etype != "match" or p.db_id not in tables)})  # matching needs only the schema
    skipped = 0
    if missing:
        n_missing = sum(p.db_id in missing for p in pairs)
        if not cfg.skip_missing_db:
            raise SqltuneError(f"{n_missing} questions use databases absent from {cfg.db_dir}: {', '.join(missing)}"
                               " (pass --skip_missing_db to leave them out)")
        pairs = [p for p in pairs if p.db_id not in missing]
        skipped = n_missing
    results = score_all(pairs, cfg, kmaps, tables)
    bad_gold = [r for r in results if r["gold_error"] and r["hardness"] is None]
    scored = [r for r in results if r["hardness"] is not None]
    if cfg.bird:
        figures = bird_figures(scored)
        table = format_bird(figures)
    else:
        scores = aggregate(scored, multi_turn, cfg.etype)
        figures = {"scores": scores, "multi_turn": multi_turn, "etype": cfg.etype}
        table = format_table(scores, cfg.etype, multi_turn)
        figures["ex"] = scores["all"]["exec"] if cfg.etype != "match" else None
        figures["em"] = scores["all"]["exact"] if cfg.etype != "exec" else None
    figures.update(count=len(scored), skipped_missing_db=skipped, gold_unparsed=len(bad_gold),
                   gold_failed=sum(1 for r in scored if r["gold_error"]))
    if not cfg.quiet:
        print(table)
        for r in results:
            if r["gold_error"]:
                print(f"warning: question {r['index'] + 1} ({r['db_id']}): {r['gold_error']}", file=sys.stderr)
        if skipped:
            print(f"note: {skipped} questions on absent databases were left out", file=sys.stderr)
    if cfg.report:
        from sqltune.eval.report import write_report

        write_report(Path(cfg.report), cfg, figures, results, table)
    return {"ex": figures.get("ex"), "em": figures.get("em"), "count": figures["count"],
            "skipped_missing_db": skipped, "details": figures}


def bird_figures(results: list[dict]) -> dict:
    levels: dict[str, list[int]] = {}
    for r in results:
        for level in ({r["hardness"], "total"} if r["hardness"] != "all" else {"total"}):
            levels.setdefault(level, []).append(r["ex"] or 0)
    table = {k: {"count": len(v), "exec": sum(v) / len(v) if v else 0.0} for k, v in levels.items()}
    return {"bird": table, "ex": table.get("total", {}).get("exec")}


def format_bird(figures: dict) -> str:
    order = [k for k in ("simple", "moderate", "challenging") if k in figures["bird"]] + ["total"]
    lines = ["{:20} ".format("") + " ".join(f"{k:<20}" for k in order),
             "{:20} ".format("count") + " ".join(f"{figures['bird'][k]['count']:<20d}" for k in order),
             "{:20} ".format("execution") + " ".join(f"{figures['bird'][k]['exec']:<20.3f}" for k in order)]
    return "\n".join(lines)

