"""The evaluate stage: prediction file + gold file -> Spider EX and EM per hardness, equal to the official script.

Inputs line up by line: the gold file holds `SQL<TAB>db_id` per line (a blank line separates interactions for
SParC/CoSQL), the prediction file one SQL per line. Examples are grouped by database and scored in parallel
worker processes; gold results are computed once per (database file, query).

Rules of our own, so that one bad line or database never aborts or skews a run:
- files: a leading BOM is dropped; lines split on `\\n` only (CRLF read as LF), so U+2028, form feed, NEL or a
  lone CR stay inside their line; a gold line splits on its last TAB; a prediction keeps its TABs, less a
  trailing `<TAB>db_id`;
- a database file that exists but cannot be used (0 bytes, not SQLite, truncated, unreadable schema) is named
  once; its questions count wrong in EX ("database unreadable"), are listed, and their EM still comes from
  tables.json. With --skip_missing_db they are left out and counted, exactly like questions whose database file
  is absent (which stop the run without that flag: a wrong --db_dir is the usual cause);
- `--max_samples N` scores the first N gold questions (multi-turn: the interactions they cover, the last one
  possibly partial, said in a note);
- multi-turn files also give question match (turn level: the official `all` column) and interaction match (every
  turn of an interaction right: the official `joint_all` column), for EX and EM.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sqltune.config import EvalConfig
from sqltune.errors import SqltuneError
from sqltune.eval.exact_match import exact_match, foreign_key_map, normalise
from sqltune.eval.execution import SQLITE_HEADER, Executor
from sqltune.eval.hardness import hardness
from sqltune.eval.parse import Schema, empty_sql, parse_sql
from sqltune.eval.safe_sqlite import MB, QueryError
from sqltune.eval.scores import aggregate, format_table
from sqltune.io import connect_read_only, database_path


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
def read_lines(path: str | Path, what: str, strict: bool = True) -> list[str]:
    """A text file's lines, split on `\\n` only (CRLF read as LF), a leading BOM dropped. (str.splitlines would also
    split at U+2028, form feed, NEL or a lone CR inside a line, and shift every later line.)"""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig", errors="strict" if strict else "replace")
    except UnicodeDecodeError as exc:
        raise SqltuneError(f"{what} file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def is_blank(line: str) -> bool:
    return not line.strip(" \t\r")


def split_blocks(lines: list[str]) -> list[list[tuple[int, str]]]:
    """Non-blank (line number, line) runs; blank lines separate interactions (several in a row count once)."""
    blocks: list[list[tuple[int, str]]] = [[]]
    for lineno, line in enumerate(lines, 1):
        if not is_blank(line):
            blocks[-1].append((lineno, line))
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def read_gold(path: str) -> tuple[list[list[tuple[str, str]]], bool]:
    """Interactions of (SQL, db_id); True when the file has several interactions (blank-line separated).

    A line splits on its last TAB (contract 1): a TAB inside the SQL, e.g. in a string literal, reads back as is.
    """
    if not path or not Path(path).is_file():
        raise SqltuneError(f"gold file not found: {path or '(none given; use --gold)'}")
    blocks = []
    for block in split_blocks(read_lines(path, "gold")):
        pairs = []
        for lineno, line in block:
            sql, tab, db_id = line.rpartition("\t")
            if not tab or not sql.strip() or not db_id.strip():
                raise SqltuneError(f"{path} line {lineno}: expected `SQL<TAB>db_id`, got {line.strip()[:80]!r}")
            pairs.append((sql.strip(), db_id.strip()))
        blocks.append(pairs)
    if not blocks:
        raise SqltuneError(f"gold file {path} is empty")
    return blocks, len(blocks) > 1


def _clean_pred(line: str, db_id: str) -> str:
    """One prediction line: a trailing `<TAB>db_id` is dropped; other TABs are kept (they may sit in a literal)."""
    text = line.strip()
    head, tab, tail = text.rpartition("\t")
    return head.strip() if tab and tail.strip() == db_id else text


def first_questions(blocks: list[list], n: int) -> list[list]:
    """The first n questions, in their blocks (the last one possibly cut)."""
    out, left = [], n
    for block in blocks:
        if left <= 0:
            break
        out.append(block[:left])
        left -= len(out[-1])
    return out


def _prefix_note(full: list[list], kept: list[list], n: int, n_all: int, multi_turn: bool) -> str:
    if not multi_turn:
        return f"note: --max_samples {n} scores the first {n} of {n_all} questions"
    last, whole = len(kept[-1]), len(full[len(kept) - 1])
    tail = f"the last one partial ({last} of its {whole} turns)" if last < whole else "all of them whole"
    return f"note: --max_samples {n} scores the first {n} of {n_all} questions: {len(kept)} interactions, {tail}"


def read_pairs(cfg: EvalConfig, questions_path: str = "") -> tuple[list[Pair], bool, str, int]:
    """(pairs, multi-turn?, note on a prefix or "", number of gold questions in the file)."""
    full, multi_turn = read_gold(cfg.gold)
    if not cfg.pred or not Path(cfg.pred).is_file():
        raise SqltuneError(f"prediction file not found: {cfg.pred or '(none given; use --pred)'}")
    lines = read_lines(cfg.pred, "prediction", strict=False)
    n_all = sum(len(b) for b in full)
    n = min(cfg.max_samples, n_all) if cfg.max_samples else n_all
    blocks = first_questions(full, n)
    prefix = n < n_all
    note = _prefix_note(full, blocks, n, n_all, multi_turn) if prefix else ""
    within = f" in its first {n} questions (--max_samples {n})" if prefix else ""
    if multi_turn:
        pred_blocks = [[line for _, line in block] for block in split_blocks(lines)]
        if prefix and [len(b) for b in pred_blocks] == [len(b) for b in full]:
            pred_blocks = first_questions(pred_blocks, n)  # a full prediction file: its first n questions
        if len(pred_blocks) != len(blocks):
            raise SqltuneError(f"{cfg.pred} has {len(pred_blocks)} interactions (blank-line separated) but "
                               f"{cfg.gold} has {len(blocks)}{within}")
        for k, (pb, gb) in enumerate(zip(pred_blocks, blocks), 1):
            if len(pb) != len(gb):
                raise SqltuneError(f"interaction {k}: {cfg.pred} has {len(pb)} lines, {cfg.gold} has {len(gb)}{within}")
    else:
        while len(lines) > n and is_blank(lines[-1]):
            lines.pop()
        if prefix and len(lines) == n_all:
            lines = lines[:n]
        if len(lines) != n:
            if prefix:
                raise SqltuneError(f"{cfg.pred} has {len(lines)} lines but --max_samples {n} scores the first {n} of "
                                   f"the {n_all} questions of {cfg.gold}: give {n} (or {n_all}) prediction lines")
            hint = " (pass --max_samples N to score the first N questions)" if len(lines) < n else ""
            raise SqltuneError(f"{cfg.pred} has {len(lines)} lines but {cfg.gold} has {n}: predictions and gold must "
                               f"line up one to one{hint}")
        pred_blocks = [lines]
    golds = [g for block in blocks for g in block]
    questions = read_questions(questions_path, golds, n_all) if questions_path else [""] * n
    difficulties = read_column(cfg.difficulty, n, n_all, "difficulty") if cfg.difficulty else [""] * n
    pairs = []
    for i, (gb, pb) in enumerate(zip(blocks, pred_blocks)):
        for turn, ((gold, db_id), pred) in enumerate(zip(gb, pb)):
            k = len(pairs)
            pairs.append(Pair(k, i, turn, db_id, gold, _clean_pred(pred, db_id), questions[k], difficulties[k]))
    return pairs, multi_turn, note, n_all


def read_column(path: str, n: int, n_all: int, what: str) -> list[str]:
    """One value per gold question (non-blank lines); the first n are used."""
    if not Path(path).is_file():
        raise SqltuneError(f"{what} file not found: {path}")
    lines = [line.strip() for line in read_lines(path, what) if line.strip()]
    if len(lines) not in (n, n_all):
        raise SqltuneError(f"{path} has {len(lines)} lines but the gold file has {n_all}")
    return lines[:n]


def read_questions(path: str, golds: list[tuple[str, str]], n_all: int) -> list[str]:
    """Questions for the report, lined up with the gold questions: from prepared JSONL records (the bare
    `question` of multi-turn records, else the question inside `input`) or a Spider/SParC/CoSQL JSON file.
    A record's db_id must be its gold line's: a file in another order is an error, not a wrong report."""
    from sqltune.data.prompts import question_of
    from sqltune.io import read_json, read_jsonl

    if path.endswith(".jsonl"):
        rows = [(r.get("question") or question_of(r), r.get("db_id")) for r in read_jsonl(path)]
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise SqltuneError(f"{path}: expected a JSON list of questions")
        rows = []
        for entry in data:
            if isinstance(entry.get("interaction"), list):  # SParC/CoSQL: one entry per interaction
                rows += [(turn.get("utterance", ""), entry.get("database_id")) for turn in entry["interaction"]]
            else:
                rows.append((entry.get("question", ""), entry.get("db_id")))
    if len(rows) not in (len(golds), n_all):
        raise SqltuneError(f"{path} has {len(rows)} questions but the gold file has {n_all}")
    for k, ((_, db_id), (_, gold_db)) in enumerate(zip(rows, golds), 1):
        if db_id and db_id != gold_db:
            raise SqltuneError(f"{path} record {k} is on database {db_id} but gold question {k} is on {gold_db}: "
                               "the questions do not line up with the gold file")
    return [str(q) for q, _ in rows[:len(golds)]]


def read_meta(pred: str) -> dict:
    """`<pred>.meta.json`, written by predict (dataset file, history mode), or {} when absent or unreadable."""
    path = Path(pred).with_name(Path(pred).name + ".meta.json")
    try:
        meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


# ------------------------------------------------------------------------------------------- databases
def database_problem(path: Path) -> str | None:
    """Why a database file cannot be used (None when it can): empty, not SQLite, truncated, unreadable schema.
    Cheap: the header, the size it promises, and one read of the schema table."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if size == 0:
        return "empty file (0 bytes)"
    if header[:16] != SQLITE_HEADER:
        return "not a SQLite database"
    if len(header) < 100:
        return f"truncated ({size} bytes)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if pages and header[24:28] == header[92:96] and size < pages * page_size:  # the page count is valid
        return f"truncated ({size} bytes of {pages * page_size})"
    try:
        conn = connect_read_only(path)
        try:
            conn.execute("SELECT name FROM sqlite_master").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"unreadable ({exc})"
    return None


def check_databases(db_dir: str, db_ids: set[str]) -> tuple[set[str], dict[str, str], list[str]]:
    """(absent db_ids, {unreadable db_id: why}, notices about -wal files whose changes are not read)."""
    absent, unreadable, notices = set(), {}, []
    for db_id in sorted(db_ids):
        path = database_path(db_dir, db_id)
        if not path.is_file():
            absent.add(db_id)
            continue
        problem = database_problem(path)
        if problem:
            unreadable[db_id] = problem
        wal = path.with_name(path.name + "-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            notices.append(f"warning: database {db_id}: {wal} holds changes that are not read (databases are opened "
                           "immutable, so nothing is written beside them; checkpoint it to include them)")
    return absent, unreadable, notices


# ------------------------------------------------------------------------------------------- scoring
_STATE: dict = {}


def _init_worker(cfg: EvalConfig, kmaps: dict, tables: dict, unreadable: dict) -> None:
    _STATE.clear()
    executor = Executor(cfg.timeout, cfg.max_rows, int(cfg.max_result_mb * MB))
    _STATE.update(cfg=cfg, kmaps=kmaps, tables=tables, unreadable=unreadable, executor=executor, schemas={})


def _schema(db_id: str, db_path: Path) -> Schema:
    schemas = _STATE["schemas"]
    if db_id not in schemas:
        if db_path.is_file() and db_id not in _STATE["unreadable"]:
            schemas[db_id] = Schema.from_sqlite(db_path)
        elif db_id in _STATE["tables"]:
            schemas[db_id] = Schema.from_tables_entry(_STATE["tables"][db_id])
        else:
            raise SqltuneError(f"database {db_id!r}: no usable file {db_path} and no entry in the tables file")
    return schemas[db_id]


def _result(pair: Pair) -> dict:
    return {"index": pair.index, "interaction": pair.interaction, "turn": pair.turn, "db_id": pair.db_id,
            "question": pair.question, "gold": pair.gold, "pred": pair.pred, "hardness": None, "ex": None,
            "em": None, "error": None, "gold_error": None, "partial": None, "difficulty": pair.difficulty}


def score_pair(pair: Pair) -> dict:
    """Hardness, EX and EM of one prediction; errors are recorded, never raised."""
    cfg: EvalConfig = _STATE["cfg"]
    db_path = database_path(cfg.db_dir, pair.db_id)
    unreadable = _STATE["unreadable"].get(pair.db_id)
    out = _result(pair)
    if cfg.bird:
        return _score_bird(out, pair.pred, db_path, unreadable)
    pred = pair.pred.replace("value", "1")  # the official Spider script's rule: a `value` placeholder becomes 1
    try:
        schema = _schema(pair.db_id, db_path)
        gold_tree = parse_sql(pair.gold, schema)
        out["hardness"] = hardness(gold_tree)
    except Exception as exc:  # noqa: BLE001 - reported per question, never a crash
        out["gold_error"] = f"gold query does not parse: {exc}"
        return out
    parse_error = None
    try:
        pred_tree = parse_sql(pred, schema)
    except Exception as exc:  # noqa: BLE001 - the official scores an unparseable prediction as the empty query
        pred_tree = empty_sql()
        parse_error = f"does not parse: {exc}"
    if cfg.etype in ("all", "exec"):
        if unreadable:
            out["ex"], out["error"] = 0, f"database unreadable: {unreadable}"
        elif db_path.is_file():
            ex, error, gold_error = _STATE["executor"].exec_match(db_path, pred, pair.gold, cfg.plug_value,
                                                                   cfg.keep_distinct)
            out["ex"], out["error"], out["gold_error"] = ex, error, gold_error
        else:
            out["ex"], out["error"] = 0, f"database file not found: {db_path}"
    if cfg.etype in ("all", "match"):
        kmap = _STATE["kmaps"].get(pair.db_id, {})
        try:
            em, partial = exact_match(normalise(pred_tree, schema, kmap), normalise(gold_tree, schema, kmap))
        except RecursionError:  # the parser's nesting bound makes this unreachable; kept as a last guard
            em, partial, parse_error = 0, None, "does not parse: nested too deeply"
        out["em"], out["partial"] = int(em), partial
        if parse_error and not out["error"]:
            out["error"] = parse_error
    if not pred.strip():
        out["error"] = "empty prediction"
    return out


def _score_bird(out: dict, pred: str, db_path: Path, unreadable: str | None) -> dict:
    """BIRD EX as the official BIRD evaluator: set(predicted rows) == set(gold rows); a timeout or an error counts
    wrong, a failing gold query too (it is also reported). No `value` placeholder rule (that is Spider's)."""
    out["hardness"] = out["difficulty"] or "all"
    if unreadable:
        out["ex"], out["error"] = 0, f"database unreadable: {unreadable}"
        return out
    ex = _STATE["executor"]
    gold_rows = ex.gold_result(db_path, out["gold"])
    if isinstance(gold_rows, QueryError):
        out["ex"], out["gold_error"] = 0, f"gold query failed on {db_path.name}: {gold_rows}"
        return out
    try:
        out["ex"] = int(set(ex.run(db_path, pred)) == set(gold_rows))
    except QueryError as exc:
        out["ex"], out["error"] = 0, str(exc)
    if not pred.strip():
        out["error"] = "empty prediction"
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


def score_all(pairs: list[Pair], cfg: EvalConfig, kmaps: dict, tables: dict, unreadable: dict) -> list[dict]:
    workers = cfg.workers or os.cpu_count() or 1
    results: list[dict] = []
    bar = tqdm(total=len(pairs), desc="evaluate", unit="q", disable=cfg.quiet or len(pairs) < 50, leave=False)
    if workers <= 1 or len(pairs) < 64:
        _init_worker(cfg, kmaps, tables, unreadable)
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
                                 initargs=(cfg, kmaps, tables, unreadable)) as pool:
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


def _questions_path(cfg: EvalConfig, meta: dict) -> str:
    """--questions, else the prepared records predict answered (named in its meta file), when they exist."""
    if cfg.questions:
        return cfg.questions
    file = (meta.get("about") or {}).get("file") or meta.get("file")
    return file if isinstance(file, str) and file.endswith(".jsonl") and Path(file).is_file() else ""


def match_figures(scores: dict, etype: str) -> tuple[dict, dict]:
    """Question match (every question: the `all` column) and interaction match (interactions with every turn
    right: the `joint_all` column), for EX and EM, as the official SParC/CoSQL evaluator prints them."""
    def pick(level: str) -> dict:
        s = scores[level]
        return {"ex": s["exec"] if etype != "match" else None, "em": s["exact"] if etype != "exec" else None,
                "count": s["count"]}
    return pick("all"), pick("joint_all")


def format_matches(question: dict, interaction: dict) -> str:
    def cells(m: dict) -> str:
        return "   ".join(f"{name} {m[key]:.3f}" for name, key in (("EX", "ex"), ("EM", "em")) if m[key] is not None)
    return "\n".join([f"{'question match':20} {cells(question)}   ({question['count']} questions, turn level)",
                      f"{'interaction match':20} {cells(interaction)}   ({interaction['count']} interactions, "
                      "every turn right)"])


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
    if not cfg.db_dir or not Path(cfg.db_dir).is_dir():
        raise SqltuneError(f"database folder not found: {cfg.db_dir or '(none given; use --db_dir)'}")
    if cfg.etype in ("all", "match") and not cfg.tables and not cfg.bird:
        raise SqltuneError("--tables (tables.json) is needed for exact match; or use --etype exec")
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
            results.append({**_result(p), "left_out": f"left out (--skip_missing_db): {why}"})
    results.sort(key=lambda r: r["index"])
    scored = [r for r in results if r["hardness"] is not None]
    history = meta.get("history") if isinstance(meta.get("history"), str) else None
    if cfg.bird:
        figures = bird_figures(scored)
        table = format_bird(figures)
    else:
        scores = aggregate(scored, multi_turn, cfg.etype)
        figures = {"scores": scores, "multi_turn": multi_turn, "etype": cfg.etype}
        table = format_table(scores, cfg.etype, multi_turn)
        figures["ex"] = scores["all"]["exec"] if cfg.etype != "match" else None
        figures["em"] = scores["all"]["exact"] if cfg.etype != "exec" else None
        if multi_turn:
            figures["question_match"], figures["interaction_match"] = match_figures(scores, cfg.etype)
            table += "\n\n" + format_matches(figures["question_match"], figures["interaction_match"])
    if history:
        table = f"history: {history} (from {Path(cfg.pred).name}.meta.json)\n" + table
    n_left_out = sum(1 for r in results if r.get("left_out"))
    figures.update(count=len(scored), total=n_all, considered=len(pairs), skipped_missing_db=n_left_out,
                   left_out_db=sorted(left_out), unreadable_db=sorted(unreadable), history=history, prefix_note=note,
                   gold_unparsed=sum(1 for r in results if r["gold_error"] and r["hardness"] is None),
                   gold_failed=sum(1 for r in scored if r["gold_error"]))
    if not cfg.quiet:
        print(table)
    for line in _warnings(results, unreadable, notices, note, cfg.skip_missing_db, cfg.quiet):
        print(line, file=sys.stderr)
    if cfg.report:
        from sqltune.eval.report import write_report

        write_report(Path(cfg.report), cfg, figures, results, table)
    out = {"ex": figures.get("ex"), "em": figures.get("em"), "count": figures["count"],
           "skipped_missing_db": n_left_out, "details": figures}
    if "question_match" in figures:
        out.update(question_match=figures["question_match"], interaction_match=figures["interaction_match"])
    return out


def _warnings(results: list[dict], unreadable: dict, notices: list[str], note: str, skip: bool,
              quiet: bool) -> list[str]:
    """Each unusable database once (even when quiet), then each failing gold query and what was left out."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r["db_id"]] = counts.get(r["db_id"], 0) + 1
    lines = [f"warning: database {db} is unusable ({why}): its {counts.get(db, 0)} questions "
             + ("are left out" if skip else "count wrong in EX") for db, why in sorted(unreadable.items())]
    lines += notices
    if quiet:
        return lines
    lines += [f"warning: question {r['index'] + 1} ({r['db_id']}): {r['gold_error']}" for r in results
              if r["gold_error"]]
    n_absent = sum(1 for r in results if r.get("left_out") and r["db_id"] not in unreadable)
    if n_absent:
        lines.append(f"note: {n_absent} questions on absent databases were left out")
    if note:
        lines.append(note)
    return lines


def bird_figures(results: list[dict]) -> dict:
    levels: dict[str, list[int]] = {}
    for r in results:
        for level in ({r["hardness"], "total"} if r["hardness"] != "all" else {"total"}):
            levels.setdefault(level, []).append(r["ex"] or 0)
    table = {k: {"count": len(v), "exec": sum(v) / len(v) if v else 0.0} for k, v in levels.items()}
    return {"bird": table, "ex": table.get("total", {}).get("exec")}


def format_bird(figures: dict) -> str:
    order = [k for k in ("simple", "moderate", "challenging") if k in figures["bird"]] + ["total"]
    if "total" not in figures["bird"]:
        return "no question scored"
    lines = ["{:20} ".format("") + " ".join(f"{k:<20}" for k in order),
             "{:20} ".format("count") + " ".join(f"{figures['bird'][k]['count']:<20d}" for k in order),
             "{:20} ".format("execution") + " ".join(f"{figures['bird'][k]['exec']:<20.3f}" for k in order)]
    return "\n".join(lines)
