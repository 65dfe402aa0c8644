"""Our evaluator prints the official Spider evaluator's figures, to the last digit, on real prediction files."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import EVAL_CASES, SPIDER, needs_eval_cases
from sqltune.config import EvalConfig
from sqltune.eval.evaluate import evaluate

CASES = {
    "dbgpthub_lora_2023": ("dbgpthub_lora_2023.sql", "dev_gold_no_wta1.sql"),
    "spider2018_pred_example": ("spider2018_pred_example.sql", "dev_gold_no_wta1.sql"),
    "official_example": ("official_example.sql", "official_example.gold.sql"),
}
FLAGS = {"--etype all": {}, "--etype all --plug_value": {"plug_value": True},
         "--etype all --keep_distinct": {"keep_distinct": True}}


def our_figures(scores: dict) -> dict:
    """Our scores in the layout of official_figures.json: {section: {row: {column: value}}}."""
    levels = [k for k in ("easy", "medium", "hard", "extra", "all", "joint_all") if k in scores]
    turns = ["turn 1", "turn 2", "turn 3", "turn 4", "turn > 4"]
    out = {"count": {lv: scores[lv]["count"] for lv in levels + turns},
           "execution accuracy": {"execution": {lv: scores[lv]["exec"] for lv in levels}},
           "exact matching accuracy": {"exact match": {lv: scores[lv]["exact"] for lv in levels}},
           "turn execution accuracy": {"execution": {t: scores[t]["exec"] for t in turns}},
           "turn exact matching accuracy": {"exact match": {t: scores[t]["exact"] for t in turns}}}
    for section, key in (("partial matching accuracy", "acc"), ("partial matching recall", "rec"),
                         ("partial matching f1", "f1")):
        out[section] = {t: {lv: scores[lv]["partial"][t][key] for lv in levels}
                        for t in scores["all"]["partial"]}
    return out


def db_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((SPIDER / "database").glob("*/*.sqlite")):
        h.update(path.read_bytes())
    return h.hexdigest()


@needs_eval_cases
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("flags", list(FLAGS))
def test_figures_equal_official(case, flags):
    official = json.loads((EVAL_CASES / "official_figures.json").read_text())[case][flags]
    pred, gold = CASES[case]
    cfg = EvalConfig(pred=str(EVAL_CASES / pred), gold=str(EVAL_CASES / gold), db_dir=str(SPIDER / "database"),
                     tables=str(SPIDER / "tables.json"), quiet=True, **FLAGS[flags])
    ours = our_figures(evaluate(cfg)["details"]["scores"])
    checked = 0
    for section, rows in official.items():
        for row, cols in rows.items():
            for col, value in cols.items():
                mine = ours["count"][col] if section == "header" else ours[section][row][col]
                assert f"{mine:.3f}" == f"{value:.3f}", f"{section} / {row} / {col}: ours {mine:.3f}, official {value}"
                checked += 1
    assert checked > 100


@needs_eval_cases
def test_gold_against_itself_is_perfect(tmp_path):
    """Every dev gold query matches itself: EM on all 1034 (schemas of absent databases come from tables.json),
    EX on the 972 whose database is present."""
    gold = SPIDER / "dev_gold.sql"
    pred = tmp_path / "pred.sql"
    pred.write_text("".join(line.split("\t")[0] + "\n" for line in gold.read_text().splitlines()))
    base = dict(pred=str(pred), gold=str(gold), db_dir=str(SPIDER / "database"), tables=str(SPIDER / "tables.json"),
                quiet=True)
    matched = evaluate(EvalConfig(etype="match", **base))
    assert matched["count"] == 1034 and matched["em"] == 1.0
    executed = evaluate(EvalConfig(etype="all", skip_missing_db=True, **base))
    assert executed["count"] == 972 and executed["ex"] == 1.0 and executed["em"] == 1.0
    assert executed["skipped_missing_db"] == 62


@needs_eval_cases
def test_shared_databases_are_unchanged_by_evaluation():
    before = db_digest()
    cfg = EvalConfig(pred=str(EVAL_CASES / "dbgpthub_lora_2023.sql"), gold=str(EVAL_CASES / "dev_gold_no_wta1.sql"),
                     db_dir=str(SPIDER / "database"), tables=str(SPIDER / "tables.json"), quiet=True)
    evaluate(cfg)
    assert db_digest() == before
