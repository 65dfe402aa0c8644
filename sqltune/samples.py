"""`sqltune samples`: the candidates `predict --num_samples N` sampled on a train split, turned into training data.

The model often samples a right answer that greedy decoding does not pick (issue 28). predict's raw file keeps every
candidate of each question (its vote record), but not whether a candidate is right: the vote compares candidates with
each other, never with the gold. So every distinct candidate is scored here against its question's gold query exactly
as `evaluate` scores a prediction (sqltune.eval.evaluate.score_all: EX's rules, Spider's or BIRD's by the dataset's
source, in the sandbox's worker processes; SQL is never run any other way). Then, per question:

- records: the distinct right candidates, at most --max_per_question, in the order predict drew them (the greedy one
  first); each is the question's own record with the candidate as its `output`;
- pairs: a right candidate (`chosen`) against a wrong one (`rejected`) of the same prompt, at most
  --max_pairs_per_question. Wrong candidates that run (a wrong result) come before those that fail (an error, a
  timeout): a near miss teaches more than a syntax error. The first pairs take each wrong candidate once, the right
  ones in turn; later pairs pair them again with the next right one, so a cap keeps the widest spread.

Both files keep the record format prepare writes (the prompt as `instruction`, `input` and `history`, unrendered):
training renders the prompt and closes the answer with the chat template (sqltune/templates.py), the one place where
prompts and the end of an answer are made, so a pair's prompt and answer end are exactly an SFT record's.

- mixed: the question's own record (its gold `output`) when its candidates are partly right and partly wrong,
  registered as `<name>_mixed`. These are the questions GRPO can learn from: a question the model always answers
  right, or never, gives a group of equal rewards and so no gradient (DAPO filters such groups while training;
  this is the same filter, offline, from the samples at hand).

Distinct means the same SQL text (ends stripped); an empty candidate (no SQL in the answer) is counted and left out.
Duplicates are also dropped across questions (two questions with the same prompt and answer give one record). A
question whose gold query fails has no right answer to learn from: it is counted and left out. Every count is
printed and kept in <name>.meta.json; the dataset is registered in dataset_info.json with its `pairs` file, so
`train --dataset <name>` learns from the records and `train --stage dpo --dataset <name>` from the pairs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from sqltune.config import EvalConfig, SamplesConfig
from sqltune.data.registry import lookup, read_registry, register_many
from sqltune.digest import records_digest, tree_digest
from sqltune.errors import SqltuneError
from sqltune.io import read_json, read_jsonl, refuse_link, temp_dir

RIGHT, RUNS, FAILS = "right", "wrong_runs", "wrong_fails"


# ------------------------------------------------------------------------------------------------ reading
def candidate_sqls(row: dict) -> list[str]:
    """The SQL of every candidate of one raw line, in the order drawn: the vote's (or retry's) candidates, else the
    one answer written (a predict run without sampling)."""
    vote = row.get("vote")
    if isinstance(vote, dict) and isinstance(vote.get("candidates"), list):
        return [c.get("sql") or "" for c in vote["candidates"] if isinstance(c, dict)]
    return [row.get("sql") or ""]


def meta_path_of(raw: Path) -> Path:
    name = raw.name
    if not name.endswith(".raw.jsonl"):
        raise SqltuneError(f"--samples {raw} is not a predict raw file (<out>.raw.jsonl)")
    return raw.with_name(name[:-len(".raw.jsonl")] + ".meta.json")


def read_inputs(cfg: SamplesConfig) -> tuple[str, dict, list[dict], list[list[str]], dict]:
    """(dataset name, its registry entry, the records answered, each record's candidate SQL, predict's meta), all
    checked: the raw file is a finished predict output of exactly these records."""
    raw = Path(cfg.samples)
    if not raw.is_file():
        raise SqltuneError(f"--samples file not found: {raw}")
    meta_path = meta_path_of(raw)
    if not meta_path.is_file():
        raise SqltuneError(f"{meta_path} is missing: --samples must be a finished predict output (its meta file "
                           "says which records it answered)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("records"), int):
        raise SqltuneError(f"{meta_path} is not a predict meta file")
    name = cfg.dataset or (meta.get("about") or {}).get("dataset") or ""
    if not name:
        raise SqltuneError(f"--dataset is required ({meta_path} names none)")
    entry = lookup(cfg.dataset_dir, name)
    if not entry.get("db_dir"):
        raise SqltuneError(f"dataset {name!r} names no db_dir: candidates are scored on its databases")
    records = list(read_jsonl(entry["file_name"]))[:meta["records"]]
    if len(records) != meta["records"] or records_digest(records) != meta.get("records_sha256"):
        raise SqltuneError(f"{raw} answers other records than dataset {name!r} holds ({entry['file_name']} changed, "
                           "or predict read another dataset): run predict again, or give the right --dataset")
    rows = list(read_jsonl(raw))
    if len(rows) != len(records) or any(row.get("index") != i for i, row in enumerate(rows)):
        raise SqltuneError(f"{raw} does not hold one line per record in order ({len(rows)} lines for "
                           f"{len(records)} records): is it a finished predict output?")
    for i, record in enumerate(records):
        if not isinstance(record.get("output"), str) or not record["output"].strip():
            raise SqltuneError(f"record {i + 1} of {entry['file_name']} has no gold SQL (`output`): samples are "
                               "built from a train split")
    return name, entry, records, [candidate_sqls(row) for row in rows], meta


# ------------------------------------------------------------------------------------------------ scoring
def distinct_candidates(sqls: list[str]) -> tuple[list[str], int, int]:
    """(distinct non-empty SQL in first-drawn order, duplicates dropped, empty candidates)."""
    seen, kept, duplicates, empty = set(), [], 0, 0
    for sql in sqls:
        key = sql.strip()
        if not key:
            empty += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            kept.append(key)
    return kept, duplicates, empty


def score_candidates(entry: dict, records: list[dict], distinct: list[list[str]], workers: int, quiet: bool
                     ) -> tuple[list[list[str]], set[int]]:
    """Each distinct candidate's verdict (RIGHT, RUNS or FAILS) and the questions whose gold query fails, scored as
    `evaluate` scores predictions: EX only, in the sandbox's workers, with the evaluator's bounds."""
    from sqltune.eval.databases import check_databases
    from sqltune.eval.evaluate import score_all
    from sqltune.eval.files import Pair

    cfg = EvalConfig(db_dir=entry["db_dir"], etype="exec", bird=entry.get("source") == "bird", workers=workers,
                     quiet=quiet)
    absent, unreadable, _ = check_databases(cfg.db_dir, {r.get("db_id", "") for r in records})
    if absent or unreadable:
        first = sorted(absent)[0] if absent else next(iter(unreadable))
        why = "missing" if absent else f"unusable ({unreadable[first]})"
        raise SqltuneError(f"candidates are scored on the databases, and {first!r} in {cfg.db_dir} is {why}")
    pairs = []  # `interaction` carries the question's index back
    for i, sqls in enumerate(distinct):
        pairs += [Pair(index=len(pairs) + k, interaction=i, turn=0, db_id=records[i].get("db_id", ""),
                       gold=records[i]["output"], pred=sql) for k, sql in enumerate(sqls)]
    results = score_all(pairs, cfg, {}, {}, {})
    verdicts: list[list[str]] = [[] for _ in distinct]
    gold_failed: set[int] = set()
    for pair, result in zip(pairs, results):
        if result.get("gold_error"):
            gold_failed.add(pair.interaction)
        verdicts[pair.interaction].append(RIGHT if result.get("ex") == 1 else FAILS if result.get("error") else RUNS)
    return verdicts, gold_failed


# ------------------------------------------------------------------------------------------------ building
def preference_pairs(right: list[str], wrong_runs: list[str], wrong_fails: list[str], cap: int
                     ) -> list[tuple[str, str, bool]]:
    """(chosen, rejected, rejected runs) pairs of one prompt, at most `cap`: wrong candidates that run first, each
    wrong one paired once (with the right ones in turn) before any is paired again."""
    wrong = [(sql, True) for sql in wrong_runs] + [(sql, False) for sql in wrong_fails]
    out = []
    for turn in range(len(right)):
        for j, (rejected, runs) in enumerate(wrong):
            if len(out) == cap:
                return out
            out.append((right[(j + turn) % len(right)], rejected, runs))
    return out


def _add_once(row: dict, rows: list[dict], seen: set[str]) -> bool:
    """Append `row` unless an equal row (all its fields) was added before; whether it was added."""
    key = json.dumps(row, sort_keys=True, ensure_ascii=False)
    if key in seen:
        return False
    seen.add(key)
    rows.append(row)
    return True


def build(records: list[dict], distinct: list[list[str]], verdicts: list[list[str]], gold_failed: set[int],
          max_per_question: int, max_pairs: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(records of right candidates, preference pairs, the mixed questions' own records, counts) from each
    question's distinct candidates and their verdicts; duplicates across questions are dropped and counted."""
    out, pairs, mixed, seen_records, seen_pairs, seen_mixed = [], [], [], set(), set(), set()
    counts = Counter()
    for i, (record, sqls, marks) in enumerate(zip(records, distinct, verdicts)):
        if i in gold_failed:
            counts["questions_gold_failed"] += 1
            continue
        by = {kind: [sql for sql, mark in zip(sqls, marks) if mark == kind] for kind in (RIGHT, RUNS, FAILS)}
        counts.update({f"candidates_{kind}": len(by[kind]) for kind in by})
        if not by[RIGHT]:
            continue
        counts["questions_with_right"] += 1
        prompt = {k: v for k, v in record.items() if k != "output"}
        for sql in by[RIGHT][:max_per_question]:
            if not _add_once({**record, "output": sql}, out, seen_records):
                counts["duplicate_records"] += 1
        counts["right_over_cap"] += max(0, len(by[RIGHT]) - max_per_question)
        for chosen, rejected, runs in preference_pairs(by[RIGHT], by[RUNS], by[FAILS], max_pairs):
            row = {**prompt, "chosen": chosen, "rejected": rejected, "rejected_runs": runs}
            if not _add_once(row, pairs, seen_pairs):
                counts["duplicate_pairs"] += 1
        if by[RUNS] or by[FAILS]:
            counts["questions_with_pair"] += 1
            _add_once(record, mixed, seen_mixed)
    return out, pairs, mixed, dict(counts)


# ------------------------------------------------------------------------------------------------ writing
def _targets(cfg: SamplesConfig, entry: dict) -> dict[str, Path]:
    root = Path(cfg.dataset_dir)
    targets = {"records": root / f"{cfg.name}.jsonl", "pairs": root / f"{cfg.name}_pairs.jsonl",
               "mixed": root / f"{cfg.name}_mixed.jsonl", "meta": root / f"{cfg.name}.meta.json"}
    inputs = {Path(cfg.samples).resolve(), meta_path_of(Path(cfg.samples)).resolve(),
              Path(entry["file_name"]).resolve()}
    for path in targets.values():
        refuse_link(path, "an output of `sqltune samples`")
        if path.resolve() in inputs:
            raise SqltuneError(f"--name {cfg.name} would overwrite the input {path}: choose another --name")
    registry = read_registry(root)
    for name in (cfg.name, f"{cfg.name}_mixed"):
        known = registry.get(name)
        if known is not None and not (isinstance(known, dict) and "samples" in known):
            raise SqltuneError(f"dataset {name!r} is registered already in {root} (not by `sqltune samples`): "
                               "choose another --name")
    return targets


def _write_together(files: dict[Path, str]) -> None:
    """Every file staged in one folder beside them, then renamed into place together (a rename replaces a link at
    the target, never writes through it), so a failure leaves the old files or the new ones, never half of one."""
    parent = next(iter(files)).parent
    stage = temp_dir(parent, ".samples-")
    try:
        for i, text in enumerate(files.values()):
            with open(stage / str(i), "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        for i, path in enumerate(files):
            os.replace(stage / str(i), path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def samples(cfg: SamplesConfig) -> dict:
    """Build, write and register the dataset; returns the counts."""
    name, entry, records, sqls, _ = read_inputs(cfg)
    targets = _targets(cfg, entry)
    distinct, duplicates, empty = zip(*(distinct_candidates(s) for s in sqls)) if sqls else ((), (), ())
    verdicts, gold_failed = score_candidates(entry, records, list(distinct), cfg.workers, cfg.quiet)
    out, pairs, mixed, counts = build(records, list(distinct), verdicts, gold_failed, cfg.max_per_question,
                               cfg.max_pairs_per_question)
    figures = {"questions": len(records), "candidates": sum(len(s) for s in sqls),
               "duplicate_candidates": sum(duplicates), "empty_candidates": sum(empty),
               "questions_with_right": counts.get("questions_with_right", 0),
               "questions_with_pair": counts.get("questions_with_pair", 0),
               "questions_gold_failed": counts.get("questions_gold_failed", 0),
               "records": len(out), "pairs": len(pairs), "mixed_questions": len(mixed),
               **{k: counts.get(k, 0) for k in (f"candidates_{RIGHT}", f"candidates_{RUNS}", f"candidates_{FAILS}",
                                                "right_over_cap", "duplicate_records", "duplicate_pairs")}}
    meta = {**figures, "dataset": name, "max_per_question": cfg.max_per_question,
            "max_pairs_per_question": cfg.max_pairs_per_question,
            "samples": str(Path(cfg.samples).resolve()), "samples_sha256": tree_digest(Path(cfg.samples)),
            "records_sha256": records_digest(records)}
    _write_together({targets["records"]: _jsonl(out), targets["pairs"]: _jsonl(pairs), targets["mixed"]: _jsonl(mixed),
                     targets["meta"]: json.dumps(meta, indent=2, ensure_ascii=False) + "\n"})
    keep = {k: entry[k] for k in ("source", "split", "schema_style", "history") if k in entry}
    keep.update({k: Path(entry[k]) for k in ("tables", "db_dir") if entry.get(k)})
    register_many(cfg.dataset_dir, {
        cfg.name: {**keep, "file_name": targets["records"], "pairs": targets["pairs"], "records": len(out),
                   "pair_records": len(pairs), "samples": targets["meta"]},
        f"{cfg.name}_mixed": {**keep, "file_name": targets["mixed"], "records": len(mixed), "samples": targets["meta"]}})
    return figures
