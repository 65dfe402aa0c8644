"""`sqltune samples` (issue 28 item 1): predict's sampled candidates on a train split become records of right
candidates and preference pairs, scored against the gold with EX's rules in the sandbox; counted, deduplicated,
capped, wrong candidates that run before those that fail, registered like any dataset."""

from __future__ import annotations

import json
import sqlite3

import pytest

from sqltune.cli import main
from sqltune.config import SamplesConfig
from sqltune.data.registry import lookup
from sqltune.samples import preference_pairs, samples
from sqltune.digest import records_digest

GT2 = "SELECT name FROM items WHERE price >= 2"
CANDIDATES = [
    ["SELECT name FROM items WHERE price > 2",  # greedy: runs, wrong (c only)
     GT2,  # right
     GT2 + "  ",  # the same SQL again (ends stripped): a duplicate
     "SELECT nme FROM items",  # fails
     "SELECT name FROM items WHERE price > 1.5",  # right
     "SELECT name FROM items WHERE id > 1",  # right
     "",  # no SQL in the answer
     "SELECT name FROM items"],  # runs, wrong
    ["SELECT count(*) FROM itemz", "SELECT count(*) FROM items WHERE id > 5"],  # no right one
    ["SELECT 1"],  # its gold fails
    [GT2],  # the same prompt as question 0 and a right answer it already gave
]


def record(question: str, gold: str) -> dict:
    return {"db_id": "shop", "instruction": "schema: items(id, name, price)\n", "input": f"###Input:\n{question}\n\n"
            "###Response:", "output": gold, "history": []}


@pytest.fixture
def toy(tmp_path):
    """A registry with one train split over a tiny SQLite database, and predict's raw and meta files for it."""
    db = tmp_path / "db" / "shop" / "shop.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE items (id INTEGER, name TEXT, price REAL)")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?)", [(1, "a", 1.0), (2, "b", 2.0), (3, "c", 3.0)])
    conn.close()
    data = tmp_path / "data"
    data.mkdir()
    records = [record("names over 1.5", "SELECT name FROM items WHERE price > 1.5"),
               record("how many items", "SELECT count(*) FROM items"),
               record("a broken gold", "SELECT * FROM nothing"),
               record("names over 1.5", "SELECT name FROM items WHERE price > 1.5")]
    (data / "toy_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "dataset_info.json").write_text(json.dumps({"toy_train": {
        "file_name": "toy_train.jsonl", "source": "spider", "split": "train", "schema_style": "words",
        "db_dir": str(tmp_path / "db")}}))
    pred = tmp_path / "pred"
    pred.mkdir()
    rows = [{"index": i, "db_id": "shop", "sql": c[0], "vote": {"candidates": [
        {"source": "greedy" if k == 0 else "sample", "sql": sql} for k, sql in enumerate(c)]}}
        for i, c in enumerate(CANDIDATES)]
    (pred / "train.sql.raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pred / "train.sql.meta.json").write_text(json.dumps({"records": 4, "records_sha256": records_digest(records),
                                                          "about": {"dataset": "toy_train"}}))
    return data, pred / "train.sql.raw.jsonl"


def run(data, raw, **kw):
    return samples(SamplesConfig(samples=str(raw), dataset_dir=str(data), name="toy_samples", workers=1, quiet=True,
                                 **kw))


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counts_records_and_pairs(toy):
    data, raw = toy
    figures = run(data, raw, max_per_question=2, max_pairs_per_question=4)
    assert figures == {"questions": 4, "candidates": 12, "duplicate_candidates": 1, "empty_candidates": 1,
                       "questions_with_right": 2, "questions_with_pair": 1, "questions_gold_failed": 1,
                       "records": 2, "pairs": 4, "mixed_questions": 1, "candidates_right": 4, "candidates_wrong_runs": 3,
                       "candidates_wrong_fails": 2, "right_over_cap": 1, "duplicate_records": 1,
                       "duplicate_pairs": 0}
    kept = rows(data / "toy_samples.jsonl")
    assert [r["output"] for r in kept] == [GT2, "SELECT name FROM items WHERE price > 1.5"]  # greedy order, capped
    assert {k: v for k, v in kept[0].items() if k != "output"} == \
        {k: v for k, v in record("names over 1.5", "x").items() if k != "output"}  # the question's own prompt
    pairs = rows(data / "toy_samples_pairs.jsonl")
    assert [(p["chosen"], p["rejected"], p["rejected_runs"]) for p in pairs] == [
        (GT2, "SELECT name FROM items WHERE price > 2", True),
        ("SELECT name FROM items WHERE price > 1.5", "SELECT name FROM items", True),
        ("SELECT name FROM items WHERE id > 1", "SELECT nme FROM items", False),  # a failing one after those that run
        ("SELECT name FROM items WHERE price > 1.5", "SELECT name FROM items WHERE price > 2", True)]
    assert all("output" not in p and p["input"] == kept[0]["input"] for p in pairs)
    meta = json.loads((data / "toy_samples.meta.json").read_text())
    assert meta["records"] == 2 and meta["pairs"] == 4 and meta["dataset"] == "toy_train"
    entry = lookup(data, "toy_samples")  # registered like any dataset, its pairs file beside
    assert entry["file_name"] == str(data / "toy_samples.jsonl") and entry["pairs"] == str(data / "toy_samples_pairs.jsonl")
    assert entry["db_dir"] == str(data.parent / "db") and entry["records"] == 2 and entry["pair_records"] == 4


def test_mixed_questions_are_grpos_data(toy):
    """Pins `<name>_mixed`: the own records (gold answers) of the questions whose candidates are partly right and
    partly wrong, registered beside the samples: question 0 only (question 1 has no right candidate, 2 a failing
    gold, 3 only right ones)."""
    data, raw = toy
    run(data, raw)
    assert rows(data / "toy_samples_mixed.jsonl") == [record("names over 1.5", "SELECT name FROM items WHERE price > 1.5")]
    entry = lookup(data, "toy_samples_mixed")
    assert entry["records"] == 1 and entry["db_dir"] == str(data.parent / "db") and entry["split"] == "train"
    assert entry["samples"] == str(data / "toy_samples.meta.json")


def test_caps(toy):
    data, raw = toy
    figures = run(data, raw, max_per_question=0, max_pairs_per_question=1)
    assert figures["records"] == 0 and figures["pairs"] == 1 and figures["right_over_cap"] == 4
    assert rows(data / "toy_samples_pairs.jsonl")[0]["rejected"] == "SELECT name FROM items WHERE price > 2"


def test_pair_order():
    """Every wrong candidate once (those that run first) before any pair repeats one, right ones in turn."""
    assert preference_pairs(["r1", "r2"], ["w1"], ["f1"], 10) == [
        ("r1", "w1", True), ("r2", "f1", False), ("r2", "w1", True), ("r1", "f1", False)]
    assert preference_pairs(["r1"], [], ["f1", "f2"], 1) == [("r1", "f1", False)]
    assert preference_pairs([], ["w1"], [], 3) == []


def one_line(capsys, words):
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_samples_of_other_records_are_refused(toy, capsys):
    """A raw file whose records changed since predict (the train file edited) is one line, nothing written."""
    data, raw = toy
    path = data / "toy_train.jsonl"
    path.write_text(path.read_text().replace("how many items", "how many things"))
    assert main(["samples", "--samples", str(raw), "--dataset_dir", str(data), "--name", "toy_samples"]) == 2
    one_line(capsys, "answers other records than dataset 'toy_train' holds")
    assert not (data / "toy_samples.jsonl").exists()


def test_missing_meta_and_bad_names_are_one_line(toy, capsys):
    data, raw = toy
    raw.with_name("train.sql.meta.json").unlink()
    assert main(["samples", "--samples", str(raw), "--dataset_dir", str(data), "--name", "toy_samples"]) == 2
    one_line(capsys, "must be a finished predict output")
    assert main(["samples", "--samples", str(raw), "--dataset_dir", str(data), "--name", "../x"]) == 2
    one_line(capsys, "--name must be a plain name")


def test_a_prepared_dataset_is_never_replaced(toy, capsys):
    """--name of a dataset prepare registered (here the very records answered) is refused, its files untouched."""
    data, raw = toy
    before = (data / "toy_train.jsonl").read_bytes()
    assert main(["samples", "--samples", str(raw), "--dataset_dir", str(data), "--name", "toy_train"]) == 2
    one_line(capsys, "would overwrite the input")
    assert (data / "toy_train.jsonl").read_bytes() == before
