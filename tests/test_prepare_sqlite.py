"""prepare --source sqlite: your own question/SQL pairs (JSONL or CSV) over your own SQLite databases, in either
layout; pairs whose SQL fails or whose database is missing are named, counted and left out; the schema (a
tables.json) comes from the databases, and evaluate scores gold-as-prediction EX 1.0 and EM 1.0 (issue 27,
item 4)."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest

from conftest import SPIDER, needs_spider
from sqltune.cli import main as cli
from sqltune.config import EvalConfig, PrepareConfig
from sqltune.data.prepare import prepare
from sqltune.data.registry import lookup
from sqltune.data.sqlite_tables import tables_entry
from sqltune.errors import SqltuneError
from sqltune.eval.evaluate import evaluate

TRAIN = [
    ("shop", "How many customers are there?", "SELECT count(*) FROM customer"),
    ("shop", "Names of customers in Oslo?", "SELECT name FROM customer WHERE city = 'Oslo'"),
    ("zoo", "Kinds of animals kept by Ada?",
     "SELECT T1.kind FROM animal AS T1 JOIN keeper AS T2 ON T1.keeper_id = T2.keeper_id WHERE T2.name = 'Ada'"),
    ("zoo", "Ages of keepers?", "SELECT age FROM keeper"),  # no such column: left out
    ("ghost", "Anything?", "SELECT 1"),  # no database: left out
    ("shop", "Total amount of orders?", "SELECT sum(amount) FROM orders"),
    ("zoo", "How many lions?", "SELECT count(*) FROM animal WHERE kind = 'lion'"),
    ("shop", "Cities with customers?", "SELECT DISTINCT city FROM customer"),
]
DEV = [
    ("zoo", "Names of keepers, sorted?", "SELECT name FROM keeper ORDER BY name"),
    ("shop", "Orders over 10, by customer name, city?",
     "SELECT T2.name, T2.city FROM orders AS T1 JOIN customer AS T2 ON T1.customer_id = T2.id WHERE T1.amount > 10"),
    ("shop", "Drop it", "DROP TABLE customer"),  # refused (read-only): left out
    ("zoo", "Keepers with more than one animal?",
     "SELECT T2.name FROM animal AS T1 JOIN keeper AS T2 ON T1.keeper_id = T2.keeper_id GROUP BY T2.name "
     "HAVING count(*) > 1"),
]


def _database(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(script)
    conn.commit()
    conn.close()


def _spider_layout(db_dir: Path) -> None:
    _database(db_dir / "shop" / "shop.sqlite", """
        CREATE TABLE customer (id INTEGER PRIMARY KEY, name VARCHAR(40), city TEXT);
        CREATE TABLE orders (order_id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customer(id), amount REAL,
                             placed DATE);
        INSERT INTO customer VALUES (1, 'Ada', 'Oslo'), (2, 'Bo', 'Rome');
        INSERT INTO orders VALUES (1, 1, 12.5, '2024-01-02'), (2, 2, 3.0, '2024-02-03'), (3, 1, 40, '2024-03-04');
    """)


def _flat_layout(db_dir: Path) -> None:
    _database(db_dir / "zoo.sqlite", """
        CREATE TABLE keeper (keeper_id INTEGER PRIMARY KEY, name TEXT);
        CREATE TABLE animal (animal_id INTEGER PRIMARY KEY, kind TEXT, keeper_id INTEGER,
                             FOREIGN KEY (keeper_id) REFERENCES keeper);
        INSERT INTO keeper VALUES (1, 'Ada'), (2, 'Bo');
        INSERT INTO animal VALUES (7, 'lion', 1), (8, 'yak', 2), (9, 'lion', 1);
    """)


@pytest.fixture
def own(tmp_path) -> Path:
    """`dbs/shop/shop.sqlite` (Spider's layout), `dbs/zoo.sqlite` (flat), pairs.jsonl and dev.csv."""
    root = tmp_path / "own"
    _spider_layout(root / "dbs")
    _flat_layout(root / "dbs")
    (root / "pairs.jsonl").write_text("".join(json.dumps({"db_id": d, "question": q, "query": s}) + "\n"
                                              for d, q, s in TRAIN))
    with open(root / "dev.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "db_id", "query", "note"])  # any column order, extra columns ignored
        writer.writerows([q, d, s, ""] for d, q, s in DEV)
    return root


def _gold_as_prediction(entry: dict, tmp_path: Path) -> dict:
    pred = tmp_path / "pred.sql"
    gold = Path(entry["gold"]).read_text().splitlines()
    pred.write_text("".join(line.rsplit("\t", 1)[0] + "\n" for line in gold))
    return evaluate(EvalConfig(pred=str(pred), gold=entry["gold"], db_dir=entry["db_dir"], tables=entry["tables"],
                               quiet=True, workers=1))


def test_pairs_and_a_dev_file_give_records_gold_tables_and_scores(own, tmp_path, capsys):
    out = tmp_path / "prepared"
    figures = prepare(PrepareConfig(source="sqlite", db_dir=str(own / "dbs"), pairs=str(own / "pairs.jsonl"),
                                    dev_pairs=str(own / "dev.csv"), out=str(out), name="mine"))
    err = capsys.readouterr().err
    assert figures["train_records"] == 6 and figures["dev_records"] == 3
    assert figures["left_out_failing_sql"] == 2 and figures["left_out_missing_database"] == 1
    assert "pairs.jsonl line 4 (zoo: " in err and "no such column: age" in err
    assert "pairs.jsonl line 5 (ghost: no ghost.sqlite in --db_dir)" in err
    assert "dev.csv line 4 (shop:" in err  # the header is line 1

    train = [json.loads(line) for line in (out / "mine_train.jsonl").read_text().splitlines()]
    assert [r["output"] for r in train] == [s for d, _, s in TRAIN if d != "ghost" and "age" not in s]
    assert "customer" in train[0]["instruction"] and "How many customers are there?" in train[0]["input"]
    gold = (out / "mine_dev_gold.sql").read_text().splitlines()
    assert gold == [f"{s}\t{d}" for d, _, s in DEV if not s.startswith("DROP")]

    tables = {e["db_id"]: e for e in json.loads((out / "mine_tables.json").read_text())}
    assert sorted(tables) == ["shop", "zoo"]
    shop, zoo = tables["shop"], tables["zoo"]
    assert shop["table_names_original"] == ["customer", "orders"]
    assert shop["column_names_original"][:4] == [[-1, "*"], [0, "id"], [0, "name"], [0, "city"]]
    assert shop["column_types"] == ["text", "number", "text", "text", "number", "number", "number", "time"]
    assert shop["primary_keys"] == [1, 4] and shop["foreign_keys"] == [[5, 1]]
    assert zoo["foreign_keys"] == [[5, 1]]  # REFERENCES keeper (no column): keeper's primary key

    entry = lookup(out, "mine_dev")
    assert entry["source"] == "sqlite" and Path(entry["tables"]) == (out / "mine_tables.json").resolve()
    db_dir = Path(entry["db_dir"])  # zoo lies flat: a folder of links in the Spider layout
    assert db_dir == (out / "mine_databases").resolve()
    assert (db_dir / "zoo" / "zoo.sqlite").resolve() == (own / "dbs" / "zoo.sqlite").resolve()
    assert (db_dir / "shop" / "shop.sqlite").resolve() == (own / "dbs" / "shop" / "shop.sqlite").resolve()

    scores = _gold_as_prediction(entry, tmp_path)
    assert scores["ex"] == 1.0 and scores["em"] == 1.0

    again = prepare(PrepareConfig(source="sqlite", db_dir=str(own / "dbs"), pairs=str(own / "pairs.jsonl"),
                                  dev_pairs=str(own / "dev.csv"), out=str(out), name="mine"))
    assert again["dev_records"] == 3 and (db_dir / "zoo" / "zoo.sqlite").is_file()  # the links replaced


def test_a_seeded_dev_fraction_from_the_command_line(own, tmp_path, capsys):
    def run(seed: str, out: Path) -> tuple[list[str], list[str]]:
        code = cli(["prepare", "--source", "sqlite", "--db_dir", str(own / "dbs"), "--pairs", str(own / "pairs.jsonl"),
                    "--dev_fraction", "0.34", "--seed", seed, "--out", str(out)])
        stdout = capsys.readouterr().out
        assert code == 0 and "train_records=4" in stdout and "dev_records=2" in stdout
        assert "left_out_failing_sql=1" in stdout and "left_out_missing_database=1" in stdout
        train = [json.loads(line)["output"] for line in (out / "sqlite_train.jsonl").read_text().splitlines()]
        dev = [line.split("\t")[0] for line in (out / "sqlite_dev_gold.sql").read_text().splitlines()]
        return train, dev

    first, second = run("3", tmp_path / "a"), run("3", tmp_path / "b")
    assert first == second
    usable = [s for d, _, s in TRAIN if d != "ghost" and "age" not in s]
    train, dev = first
    assert sorted(train + dev) == sorted(usable) and not set(train) & set(dev)
    assert train == [s for s in usable if s in train]  # file order kept
    assert {tuple(run(str(seed), tmp_path / f"s{seed}")[1]) for seed in range(6)} != {tuple(dev)}  # seed matters

    scores = _gold_as_prediction(lookup(tmp_path / "a", "sqlite_dev"), tmp_path)
    assert scores["ex"] == 1.0 and scores["em"] == 1.0


def test_databases_all_in_the_spider_layout_are_read_in_place(tmp_path):
    _spider_layout(tmp_path / "dbs")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"db_id": d, "question": q, "query": s}) + "\n"
                                                  for d, q, s in TRAIN if d == "shop"))
    out = tmp_path / "prepared"
    figures = prepare(PrepareConfig(source="sqlite", db_dir=str(tmp_path / "dbs"), pairs=str(tmp_path / "pairs.jsonl"),
                                    splits="dev", out=str(out)))
    assert figures["dev_records"] == 4 and figures["left_out_failing_sql"] == 0
    entry = lookup(out, "sqlite_dev")
    assert Path(entry["db_dir"]) == (tmp_path / "dbs").resolve() and not (out / "sqlite_databases").exists()
    assert _gold_as_prediction(entry, tmp_path)["ex"] == 1.0


def _one_line_error(args: list[str], capsys) -> str:
    code = cli(["prepare", "--source", "sqlite", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line_errors(own, tmp_path, capsys):
    base = ["--db_dir", str(own / "dbs"), "--out", str(tmp_path / "o")]
    pairs = ["--pairs", str(own / "pairs.jsonl")]

    def write(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    assert "needs --pairs" in _one_line_error(base, capsys)
    assert "needs --db_dir" in _one_line_error(pairs, capsys)
    assert "--dev_pairs FILE or --dev_fraction" in _one_line_error(base + pairs, capsys)
    assert "not both" in _one_line_error(base + pairs + ["--dev_pairs", "x.csv", "--dev_fraction", "0.2"], capsys)
    assert "--dev_fraction must be in [0, 1)" in _one_line_error(base + pairs + ["--dev_fraction", "1.5"], capsys)
    assert "--dev_pairs file not found" in _one_line_error(base + pairs + ["--dev_pairs", "nope.csv"], capsys)
    assert "splits train and dev, not test" in _one_line_error(base + pairs + ["--splits", "train,test"], capsys)
    err = _one_line_error(base + ["--splits", "train", "--pairs", write("a.csv", "db_id,question,sql\nzoo,q,x\n")],
                          capsys)
    assert "has no 'query' column" in err and "db_id, question, sql" in err
    err = _one_line_error(base + ["--splits", "train", "--pairs",
                                  write("b.csv", 'db_id,question,query\nzoo,"unclosed,SELECT 1\n')], capsys)
    assert "bad CSV in" in err
    err = _one_line_error(base + ["--splits", "train", "--pairs",
                                  write("c.csv", "db_id,question,query\nzoo,q,SELECT 1,extra\n")], capsys)
    assert "line 2 has 4 fields, the header has 3" in err
    err = _one_line_error(base + ["--splits", "train", "--pairs",
                                  write("d.jsonl", '{"db_id": "zoo", "question": "q", "query": "SELECT 1"}\n{oops\n')],
                          capsys)
    assert "malformed JSON in" in err and "line 2" in err
    err = _one_line_error(base + ["--splits", "train", "--pairs",
                                  write("e.jsonl", '{"db_id": "zoo", "question": "q"}\n')], capsys)
    assert "line 1 has no 'query' field" in err
    err = _one_line_error(base + ["--splits", "train", "--pairs",
                                  write("f.jsonl", '{"db_id": "../zoo", "question": "q", "query": "SELECT 1"}\n')],
                          capsys)
    assert "is not a database name" in err
    err = _one_line_error(base + ["--splits", "train", "--pairs",
                                  write("g.jsonl", '{"db_id": "ghost", "question": "q", "query": "SELECT 1"}\n')],
                          capsys)
    assert "no usable pair left" in err and "ghost" in err
    (tmp_path / "h.csv").write_bytes(b"db_id,question,query\nzoo,caf\xe9,SELECT 1\n")
    err = _one_line_error(base + ["--splits", "train", "--pairs", str(tmp_path / "h.csv")], capsys)
    assert "is not UTF-8" in err and "line 2" in err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_a_folder_in_the_way_of_the_links_is_refused(own, tmp_path):
    out = tmp_path / "prepared"
    (out / "sqlite_databases").mkdir(parents=True)
    (out / "sqlite_databases" / "notes.txt").write_text("mine")
    with pytest.raises(SqltuneError, match="not a folder of database links"):
        prepare(PrepareConfig(source="sqlite", db_dir=str(own / "dbs"), pairs=str(own / "pairs.jsonl"),
                              splits="train", out=str(out)))
    assert (out / "sqlite_databases" / "notes.txt").read_text() == "mine"


@needs_spider
@pytest.mark.parametrize("db_id", ["concert_singer", "pets_1", "car_1", "flight_2", "orchestra", "cre_Doc_Template_Mgt"])
def test_the_schema_read_from_a_database_is_spiders(db_id):
    """Spider's tables.json was built from these files by get_tables.py; ours is built by the same rules."""
    spider = {e["db_id"]: e for e in json.loads((SPIDER / "tables.json").read_text())}[db_id]
    ours = tables_entry(SPIDER / "database" / db_id / f"{db_id}.sqlite", db_id)
    for key in ("table_names_original", "column_names_original", "primary_keys"):
        assert ours[key] == spider[key], key
    assert sorted(ours["foreign_keys"]) == sorted(spider["foreign_keys"])


def test_a_pairs_file_changed_in_place_changes_what_a_run_calls_prepare(own, tmp_path):
    """`run` reruns prepare when its inputs change under the same path: the pairs files count as inputs."""
    from sqltune.pipeline import identity

    cfg = PrepareConfig(source="sqlite", db_dir=str(own / "dbs"), pairs=str(own / "pairs.jsonl"),
                        dev_pairs=str(own / "dev.csv"), out=str(tmp_path / "run" / "data"))
    before = identity(cfg, run=tmp_path / "run")
    with open(own / "dev.csv", "a") as handle:
        handle.write("How many keepers?,zoo,SELECT count(*) FROM keeper,\n")
    assert identity(cfg, run=tmp_path / "run") != before
