"""Reading the evaluator's inputs and lining them up: gold file, prediction file, questions, difficulties, meta.

The gold file holds `SQL<TAB>db_id` per line (a blank line separates interactions for SParC/CoSQL), the
prediction file one SQL per line. Rules of our own, so that one odd line never shifts or aborts a run:
- a leading BOM is dropped; lines split on `\\n` only (CRLF read as LF), so U+2028, form feed, NEL or a lone CR
  stay inside their line; a gold line splits on its last TAB; a prediction keeps its TABs, less a trailing
  `<TAB>db_id`;
- `--max_samples N` scores the first N gold questions (multi-turn: the interactions they cover, the last one
  possibly partial, said in a note).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sqltune.config import EvalConfig
from sqltune.errors import SqltuneError


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


