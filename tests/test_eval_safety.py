"""Model-written SQL never changes a database or creates a file, and never runs for ever."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from sqltune.cli import main
from sqltune.config import EvalConfig
from sqltune.eval.evaluate import evaluate
from sqltune.sandbox.readonly import QueryError, connect, run_query

HOSTILE = [
    "DROP TABLE customer",
    "DELETE FROM customer",
    "UPDATE customer SET age = 0",
    "INSERT INTO customer VALUES (99, 'x', 'y', 1)",
    "CREATE TABLE evil (a)",
    "ATTACH DATABASE '{dir}/evil.sqlite' AS evil",
    "VACUUM INTO '{dir}/copy.sqlite'",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = WAL",
    "SELECT load_extension('/nonexistent/evil')",
    "WITH x AS (SELECT 1) DELETE FROM customer",
]


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def db_copy(demo_dir, tmp_path):
    target = tmp_path / "database"
    shutil.copytree(demo_dir / "database", target)
    return target


def test_hostile_predictions_change_nothing(db_copy, demo_dir, tmp_path):
    before = digest(db_copy)
    preds = [q.format(dir=db_copy / "shop") for q in HOSTILE]
    (tmp_path / "gold.sql").write_text("SELECT name FROM customer\tshop\n" * len(preds))
    (tmp_path / "pred.sql").write_text("\n".join(preds) + "\n")
    out = evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), db_dir=str(db_copy),
                              tables=str(demo_dir / "tables.json"), quiet=True, workers=1,
                              report=str(tmp_path / "report")))
    assert out["ex"] == 0.0 and out["count"] == len(preds)
    assert digest(db_copy) == before  # same files, same bytes: nothing written, nothing created


def test_second_statement_never_runs(db_copy, demo_dir, tmp_path):
    """Only the first statement of a line runs (as in the official script); the rest is never executed."""
    before = digest(db_copy)
    (tmp_path / "gold.sql").write_text("SELECT name FROM customer\tshop\n")
    (tmp_path / "pred.sql").write_text("SELECT name FROM customer; DROP TABLE customer\n")
    out = evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), db_dir=str(db_copy),
                              tables=str(demo_dir / "tables.json"), quiet=True))
    assert out["ex"] == 1.0
    assert digest(db_copy) == before


def test_runaway_cross_join_is_stopped(db_copy):
    conn = connect(db_copy / "shop" / "shop.sqlite")
    joined = ", ".join(f"customer AS c{i}" for i in range(14))
    with pytest.raises(QueryError, match="timed out"):
        run_query(conn, f"SELECT count(*) FROM {joined}", timeout=0.5, max_rows=1000)
    with pytest.raises(QueryError, match="more than 1000 rows"):
        run_query(conn, f"SELECT * FROM {joined}", timeout=30, max_rows=1000)
    assert run_query(conn, "SELECT count(*) FROM customer", timeout=5, max_rows=10) == [(25,)]  # still usable


def test_runaway_prediction_counts_wrong(db_copy, demo_dir, tmp_path):
    joined = ", ".join(f"customer AS c{i}" for i in range(14))
    (tmp_path / "gold.sql").write_text("SELECT count(*) FROM customer\tshop\n")
    (tmp_path / "pred.sql").write_text(f"SELECT count(*) FROM {joined}\n")
    out = evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), db_dir=str(db_copy),
                              tables=str(demo_dir / "tables.json"), quiet=True, timeout=0.5, report=str(tmp_path / "r")))
    assert out["ex"] == 0.0
    assert "timed out" in (tmp_path / "r" / "per_example.jsonl").read_text()


def test_input_errors_are_one_line(db_copy, demo_dir, tmp_path, capsys):
    (tmp_path / "gold.sql").write_text("SELECT 1\tshop\nSELECT 2\tshop\n")
    (tmp_path / "pred.sql").write_text("SELECT 1\n")
    base = ["evaluate", "--gold", str(tmp_path / "gold.sql"), "--db_dir", str(db_copy), "--tables",
            str(demo_dir / "tables.json")]
    assert main(base + ["--pred", str(tmp_path / "pred.sql")]) == 2
    err = capsys.readouterr().err
    assert "has 1 lines but" in err and "has 2" in err and err.count("\n") == 1
    assert main(base + ["--pred", str(tmp_path / "missing.sql")]) == 2
    assert "prediction file not found" in capsys.readouterr().err
    (tmp_path / "gold2.sql").write_text("SELECT 1\tnowhere_db\n")
    assert main(["evaluate", "--gold", str(tmp_path / "gold2.sql"), "--pred", str(tmp_path / "pred.sql"),
                 "--db_dir", str(db_copy), "--tables", str(demo_dir / "tables.json")]) == 2
    assert "nowhere_db" in capsys.readouterr().err


def test_blank_prediction_line_is_an_empty_prediction(db_copy, demo_dir, tmp_path):
    (tmp_path / "gold.sql").write_text("SELECT count(*) FROM customer\tshop\nSELECT count(*) FROM product\tshop\n")
    (tmp_path / "pred.sql").write_text("\nSELECT count(*) FROM product\n")
    out = evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), db_dir=str(db_copy),
                              tables=str(demo_dir / "tables.json"), quiet=True))
    assert out["ex"] == 0.5


def test_evaluation_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, sqltune.cli, sqltune.eval.evaluate; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
