"""prepare --drop_failing_gold: train records whose gold query fails, times out or returns no rows are left out and
counted; other splits and the default keep every record (issue #16, section 3)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from sqltune.cli import main as cli
from sqltune.config import PrepareConfig
from sqltune.data.prepare import prepare
from sqltune.data.registry import lookup

TRAIN = [
    ("zoo", "How many keepers?", "SELECT count(*) FROM keeper"),  # runs, one row
    ("zoo", "Names of lions' keepers?", ("SELECT k.name FROM keeper AS k JOIN animal AS a ON a.keeper_id = "
                                         "k.keeper_id WHERE a.kind = 'lion'")),  # runs, rows
    ("zoo", "Keepers named Zed?", "SELECT * FROM keeper WHERE name = 'Zed'"),  # no rows
    ("zoo", "Ages of keepers?", "SELECT age FROM keeper"),  # no such column
    ("zoo", "Drop it", "DROP TABLE keeper"),  # refused: read-only
    ("gone", "Anything?", "SELECT 1"),  # database missing
]
DEV = [("zoo", "Keepers named Zed?", "SELECT * FROM keeper WHERE name = 'Zed'")]


def _rows(items: list[tuple[str, str, str]]) -> str:
    return json.dumps([{"db_id": d, "question": q, "query": s} for d, q, s in items])


def _entry(db_id: str) -> dict:
    return {"db_id": db_id, "table_names_original": ["keeper", "animal"], "table_names": ["keeper", "animal"],
            "column_names_original": [[-1, "*"], [0, "keeper_id"], [0, "name"], [1, "animal_id"], [1, "kind"],
                                      [1, "keeper_id"]],
            "column_names": [[-1, "*"], [0, "keeper id"], [0, "name"], [1, "animal id"], [1, "kind"],
                             [1, "keeper id"]],
            "column_types": ["text", "number", "text", "number", "text", "number"],
            "primary_keys": [1, 3], "foreign_keys": [[5, 1]]}


@pytest.fixture
def zoo(tmp_path) -> Path:
    """A Spider-layout folder with one small database (and a schema for a database whose file is absent)."""
    root = tmp_path / "zoo_spider"
    (root / "database" / "zoo").mkdir(parents=True)
    conn = sqlite3.connect(root / "database" / "zoo" / "zoo.sqlite")
    conn.execute("CREATE TABLE keeper (keeper_id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("CREATE TABLE animal (animal_id INTEGER PRIMARY KEY, kind TEXT, keeper_id INTEGER)")
    conn.executemany("INSERT INTO keeper VALUES (?, ?)", [(1, "Ada"), (2, "Bo")])
    conn.executemany("INSERT INTO animal VALUES (?, ?, ?)", [(7, "lion", 1), (8, "yak", 2)])
    conn.commit()
    conn.close()
    (root / "tables.json").write_text(json.dumps([_entry("zoo"), _entry("gone")]))
    (root / "train_spider.json").write_text(_rows(TRAIN))
    (root / "dev.json").write_text(_rows(DEV))
    return root


def _outputs(path: Path) -> list[str]:
    return [json.loads(line)["output"] for line in path.read_text().splitlines()]


def test_failing_gold_train_records_are_dropped_and_counted(zoo, tmp_path, capsys):
    out = tmp_path / "prepared"
    figures = prepare(PrepareConfig(data_dir=str(zoo), out=str(out), drop_failing_gold=True))
    assert figures["train_dropped_failing_gold"] == 4
    assert figures["train_records"] == 2
    assert _outputs(out / "spider_train.jsonl") == [TRAIN[0][2], TRAIN[1][2]]
    assert lookup(out, "spider_train")["dropped_failing_gold"] == 4
    # dev is never filtered: its empty-result gold stays (evaluation compares results, empty ones too)
    assert figures["dev_records"] == 1 and "dropped_failing_gold" not in lookup(out, "spider_dev")
    err = capsys.readouterr().err
    assert ("prepare: spider_train: dropped 4 records whose gold query fails or returns no rows "
            "(2 error, 1 no rows, 1 no database)") in err.splitlines()
    # the database was only read: no journal or WAL files beside it, the table refused a DROP still exists
    assert sorted(p.name for p in (zoo / "database" / "zoo").iterdir()) == ["zoo.sqlite"]
    with sqlite3.connect(zoo / "database" / "zoo" / "zoo.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM keeper").fetchone() == (2,)


def test_records_without_database_are_counted_after_the_drop(zoo, tmp_path, capsys):
    """Pins the count of kept records whose database is missing: the drop removes them, so it is 0 and the split's
    line says nothing of them (it used to count them before the drop: "2 records (...; 1 whose database is
    missing")."""
    figures = prepare(PrepareConfig(data_dir=str(zoo), out=str(tmp_path / "o"), drop_failing_gold=True))
    assert figures["train_records_without_database"] == 0
    assert figures["missing_databases"] == ["gone"]
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("prepare: spider_train: 2 records"))
    assert "missing" not in line


def test_default_keeps_every_record(zoo, tmp_path):
    out = tmp_path / "prepared"
    figures = prepare(PrepareConfig(data_dir=str(zoo), out=str(out)))
    assert figures["train_records"] == len(TRAIN) and "train_dropped_failing_gold" not in figures
    assert "dropped_failing_gold" not in lookup(out, "spider_train")


def test_cli_flag_prints_the_figure(zoo, tmp_path, capsys):
    code = cli(["prepare", "--data_dir", str(zoo), "--out", str(tmp_path / "o"), "--drop_failing_gold"])
    out = capsys.readouterr().out
    assert code == 0 and "train_dropped_failing_gold=4" in out


def test_slow_gold_counts_as_failing(zoo, tmp_path, monkeypatch):
    """A gold query past the time bound is dropped (bounded like evaluation), not waited for."""
    import sqltune.data.prepare as prep

    monkeypatch.setattr(prep, "GOLD_TIMEOUT", 0.05)
    slow = ("zoo", "Slow?", "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c")
    (zoo / "train_spider.json").write_text(_rows([TRAIN[0], slow]))
    figures = prepare(PrepareConfig(data_dir=str(zoo), out=str(tmp_path / "o"), drop_failing_gold=True))
    assert figures["train_dropped_failing_gold"] == 1 and figures["train_records"] == 1


def test_an_unusable_database_is_named_once_and_none_of_its_queries_run(zoo, tmp_path, capsys):
    """Pins (issue 26): a database file that exists but cannot be used failed every one of its train gold queries
    in turn, unnamed; now it is checked once, named in one warning, and its records count as `no database`."""
    (zoo / "database" / "zoo" / "zoo.sqlite").write_bytes(b"not a database at all" * 10)
    figures = prepare(PrepareConfig(data_dir=str(zoo), out=str(tmp_path / "o"), drop_failing_gold=True))
    err = capsys.readouterr().err
    assert err.count("zoo.sqlite is unusable (not a SQLite database)") == 1
    assert "0 error, 0 no rows, 6 no database" in err and figures["train_dropped_failing_gold"] == 6
