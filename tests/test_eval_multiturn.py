"""Multi-turn evaluation (SParC/CoSQL): question match and interaction match for EX and EM, evaluating a prefix
(`--max_samples`), the history mode named from `<pred>.meta.json`, and questions from prepared records."""

from __future__ import annotations

import json

import pytest
from conftest import EVAL_CASES, SHARED, SPIDER, needs_eval_cases

from sqltune.cli import main
from sqltune.config import EvalConfig
from sqltune.errors import SqltuneError
from sqltune.eval.evaluate import evaluate

needs_multiturn = pytest.mark.skipif(
    not (SHARED / "sparc" / "dev_gold.txt").is_file() or not (SHARED / "cosql" / "dev_gold.txt").is_file()
    or not (SPIDER / "database").is_dir(), reason="../shared/sparc, ../shared/cosql or ../shared/spider is absent")

# three interactions of 2, 3 and 1 turns on the demo databases: (gold, prediction)
INTERACTIONS = [
    [("SELECT name FROM customer", "SELECT name FROM customer"),
     ("SELECT name FROM customer WHERE age > 30", "SELECT name FROM customer WHERE age > 30")],
    [("SELECT count(*) FROM product", "SELECT count(*) FROM product"),
     ("SELECT max(price) FROM product", "SELECT min(price) FROM product"),  # wrong on EX and EM
     ("SELECT name FROM product ORDER BY price DESC", "SELECT name FROM product ORDER BY price DESC")],
    [("SELECT count(*) FROM customer", "SELECT count(customer_id) FROM customer")],  # right on EX, not on EM
]


def write_blocks(path, blocks: list[list[str]]) -> None:
    path.write_text("\n\n".join("\n".join(block) for block in blocks) + "\n")


@pytest.fixture
def multi(tmp_path, demo_dir):
    gold, pred = tmp_path / "gold.txt", tmp_path / "pred.sql"
    write_blocks(gold, [[f"{g}\tshop" for g, _ in block] for block in INTERACTIONS])
    write_blocks(pred, [[p for _, p in block] for block in INTERACTIONS])
    return dict(pred=str(pred), gold=str(gold), db_dir=str(demo_dir / "database"),
                tables=str(demo_dir / "tables.json"), workers=1)


def test_question_and_interaction_match(multi, capsys):
    """Pins: evaluate gave no question match / interaction match figures for multi-turn files (the official
    SParC/CoSQL script's turn-level and joint figures), for EX and EM."""
    out = evaluate(EvalConfig(**multi))
    assert out["question_match"] == {"ex": pytest.approx(5 / 6), "em": pytest.approx(4 / 6), "count": 6}
    assert out["interaction_match"] == {"ex": pytest.approx(2 / 3), "em": pytest.approx(1 / 3), "count": 3}
    printed = capsys.readouterr().out
    assert "question match" in printed and "interaction match" in printed
    line = next(x for x in printed.splitlines() if x.startswith("interaction match"))
    assert "0.667" in line and "0.333" in line


def test_single_turn_has_no_interaction_figures(tmp_path, demo_dir):
    (tmp_path / "gold.sql").write_text("SELECT name FROM customer\tshop\n")
    (tmp_path / "pred.sql").write_text("SELECT name FROM customer\n")
    out = evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), quiet=True,
                              db_dir=str(demo_dir / "database"), tables=str(demo_dir / "tables.json")))
    assert "interaction_match" not in out


# ------------------------------------------------------------------------------------------- prefix
def test_max_samples_single_turn(tmp_path, demo_dir, capsys):
    """Pins: a prediction file made with `predict --max_samples N` could not be evaluated ("has 3 lines but ...
    gold has 5"); `evaluate --max_samples N` scores the first N gold questions."""
    golds = ["SELECT name FROM customer", "SELECT count(*) FROM product", "SELECT city FROM customer",
             "SELECT name FROM product", "SELECT age FROM customer"]
    (tmp_path / "gold.sql").write_text("".join(f"{g}\tshop\n" for g in golds))
    (tmp_path / "pred.sql").write_text("\n".join(golds[:3]) + "\n")
    base = dict(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), quiet=True, workers=1,
                db_dir=str(demo_dir / "database"), tables=str(demo_dir / "tables.json"))
    out = evaluate(EvalConfig(max_samples=3, **base))
    assert out["count"] == 3 and out["ex"] == 1.0
    with pytest.raises(SqltuneError, match="has 3 lines but .* has 5"):
        evaluate(EvalConfig(**base))
    (tmp_path / "pred.sql").write_text("\n".join(golds) + "\n")  # a full file: its first N lines are scored
    assert evaluate(EvalConfig(max_samples=3, **base))["count"] == 3
    (tmp_path / "pred.sql").write_text("\n".join(golds[:4]) + "\n")
    with pytest.raises(SqltuneError, match="4 lines.*--max_samples 3"):
        evaluate(EvalConfig(max_samples=3, **base))
    cmd = ["evaluate", "--pred", base["pred"], "--gold", base["gold"], "--db_dir", base["db_dir"], "--tables",
           base["tables"], "--max_samples", "-2"]
    assert main(cmd) == 2 and "--max_samples" in capsys.readouterr().err


def test_max_samples_multi_turn_covers_partial_interaction(multi, tmp_path, capsys):
    """Pins: the same for SParC/CoSQL: the first N questions cover whole interactions and a partial last one,
    which is said in one printed note; the prediction file holds those N records in blocks."""
    write_blocks(tmp_path / "pred.sql", [[p for _, p in INTERACTIONS[0]], [p for _, p in INTERACTIONS[1][:2]]])
    out = evaluate(EvalConfig(max_samples=4, **multi))
    assert out["count"] == 4 and out["question_match"]["count"] == 4 and out["interaction_match"]["count"] == 2
    assert out["interaction_match"]["ex"] == 0.5
    notes = [line for line in capsys.readouterr().err.splitlines() if "max_samples" in line]
    assert len(notes) == 1 and "2 interactions" in notes[0] and "partial" in notes[0] and "2 of its 3" in notes[0]
    write_blocks(tmp_path / "pred.sql", [[p for _, p in INTERACTIONS[0]], [p for _, p in INTERACTIONS[1]]])
    with pytest.raises(SqltuneError, match="interaction 2"):
        evaluate(EvalConfig(max_samples=4, **multi))


def test_multi_turn_count_mismatch_names_both_counts(multi, tmp_path):
    write_blocks(tmp_path / "pred.sql", [[p for _, p in INTERACTIONS[0]]])
    with pytest.raises(SqltuneError, match="1 interactions .* 3"):
        evaluate(EvalConfig(**multi))


# ------------------------------------------------------------------------------------------- meta and questions
def test_history_mode_is_named_from_meta(multi, tmp_path, capsys):
    """Pins contract 4: the history mode of `<pred>.meta.json` was not named in the table or the report."""
    (tmp_path / "pred.sql.meta.json").write_text(json.dumps({"dataset": "x", "history": "questions"}))
    out = evaluate(EvalConfig(report=str(tmp_path / "report"), **multi))
    assert out["details"]["history"] == "questions"
    assert "history: questions" in capsys.readouterr().out
    assert "history: questions" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["history"] == "questions"


def prepared_records(with_question_field: bool = True) -> list[dict]:
    rows = []
    for n, block in enumerate(INTERACTIONS):
        for t, (g, _) in enumerate(block):
            question = f"question {n}.{t}"
            earlier = [f"question {n}.{k}" for k in range(t)]
            row = {"db_id": "shop", "instruction": "schema", "history": [], "output": g,
                   "input": "###Input:\n" + "\n".join(earlier + [question]) + "\n\n###Response:"}
            if with_question_field:
                row.update(interaction=n, turn=t, question=question)
            rows.append(row)
    return rows


def test_questions_from_prepared_multi_turn_records(multi, tmp_path):
    """Pins: per_example.jsonl questions of multi-turn records held every earlier question too (the prompt's
    input); records carry the bare `question`; a prefix (--max_samples) reads the first N of them."""
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prepared_records()))
    report = tmp_path / "report"
    evaluate(EvalConfig(questions=str(path), report=str(report), **multi))
    rows = [json.loads(line) for line in open(report / "per_example.jsonl")]
    assert [r["question"] for r in rows] == [f"question {n}.{t}" for n, b in enumerate(INTERACTIONS)
                                            for t in range(len(b))]
    write_blocks(tmp_path / "pred.sql", [[p for _, p in INTERACTIONS[0]], [p for _, p in INTERACTIONS[1][:1]]])
    evaluate(EvalConfig(questions=str(path), report=str(report), max_samples=3, **multi))
    rows = [json.loads(line) for line in open(report / "per_example.jsonl")]
    assert [r["question"] for r in rows] == ["question 0.0", "question 0.1", "question 1.0"]


def test_questions_are_found_from_the_prediction_meta(multi, tmp_path):
    """Pins: per_example.jsonl had empty questions unless --questions was given, though predict's meta file names
    the prepared records it answered."""
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prepared_records()))
    (tmp_path / "pred.sql.meta.json").write_text(json.dumps({"file": str(path), "history": "questions"}))
    evaluate(EvalConfig(report=str(tmp_path / "report"), **multi))
    rows = [json.loads(line) for line in open(tmp_path / "report" / "per_example.jsonl")]
    assert rows[0]["question"] == "question 0.0" and rows[-1]["question"] == "question 2.0"


def test_questions_that_do_not_line_up_are_one_line(multi, tmp_path):
    records = prepared_records()
    records[2]["db_id"] = "school"
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SqltuneError, match="record 3.*school.*shop"):
        evaluate(EvalConfig(questions=str(path), **multi))


# ------------------------------------------------------------------------------------------- real data
@needs_multiturn
@pytest.mark.parametrize("name", ["sparc", "cosql"])
def test_real_gold_against_itself(name, tmp_path):
    """Gold against itself on the real SParC/CoSQL dev sets: question and interaction match 1.0 for EM; for EX
    every miss is a gold query that fails on its database, reported (not a crash)."""
    gold = SHARED / name / "dev_gold.txt"
    lines = gold.read_text().split("\n")
    (tmp_path / "pred.sql").write_text("\n".join(line.rpartition("\t")[0] for line in lines))
    out = evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(gold), db_dir=str(SPIDER / "database"),
                              tables=str(SHARED / name / "tables.json"), skip_missing_db=True, quiet=True,
                              report=str(tmp_path / "report")))
    rows = [json.loads(line) for line in open(tmp_path / "report" / "per_example.jsonl")]
    assert out["question_match"]["em"] == 1.0 and out["interaction_match"]["em"] == 1.0
    misses = [r for r in rows if r["ex"] == 0]
    assert all("gold query failed" in r["error"] for r in misses) and len(misses) <= 3
    assert out["details"]["gold_failed"] == len(misses)
    failed = {r["interaction"] for r in misses}
    n = out["interaction_match"]["count"]
    assert out["interaction_match"]["ex"] == pytest.approx((n - len(failed)) / n)
    assert out["count"] + out["skipped_missing_db"] == sum(1 for line in lines if line.strip())


@needs_eval_cases
def test_official_multi_turn_case_question_and_interaction_match():
    """The official example (SParC-style): question match = the official `all` column, interaction match = its
    `joint_all` column, for EX and EM."""
    official = json.loads((EVAL_CASES / "official_figures.json").read_text())["official_example"]["--etype all"]
    out = evaluate(EvalConfig(pred=str(EVAL_CASES / "official_example.sql"), quiet=True,
                              gold=str(EVAL_CASES / "official_example.gold.sql"), db_dir=str(SPIDER / "database"),
                              tables=str(SPIDER / "tables.json")))
    ex, em = official["execution accuracy"]["execution"], official["exact matching accuracy"]["exact match"]
    assert f"{out['question_match']['ex']:.3f}" == f"{ex['all']:.3f}"
    assert f"{out['question_match']['em']:.3f}" == f"{em['all']:.3f}"
    assert f"{out['interaction_match']['ex']:.3f}" == f"{ex['joint_all']:.3f}"
    assert f"{out['interaction_match']['em']:.3f}" == f"{em['joint_all']:.3f}"
