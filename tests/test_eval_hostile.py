"""Hostile and careless inputs to `sqltune evaluate` (issue #13 section 2, #12 section 6): one bad line, database or
query never aborts or skews the run, and every question is accounted for. Each test names the failure it pins."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT

from sqltune.cli import main
from sqltune.config import EvalConfig
from sqltune.eval.evaluate import evaluate
from sqltune.eval.databases import database_files
from sqltune.eval.parse import ParseError, Schema, parse_sql

SHOP_GOLD = ["SELECT name FROM customer", "SELECT count(*) FROM product", "SELECT city FROM customer WHERE age > 30"]


@pytest.fixture
def db_copy(demo_dir, tmp_path):
    target = tmp_path / "database"
    shutil.copytree(demo_dir / "database", target)
    return target


def run_eval(tmp_path, gold: list[str], pred: list[str], db_dir, tables, gold_text=None, pred_text=None, **kw):
    """Write the two files (or the raw texts given), evaluate, and return (figures, per-example rows)."""
    (tmp_path / "gold.sql").write_text(gold_text if gold_text is not None else "".join(g + "\n" for g in gold),
                                       encoding="utf-8", newline="")
    (tmp_path / "pred.sql").write_text(pred_text if pred_text is not None else "".join(p + "\n" for p in pred),
                                       encoding="utf-8", newline="")
    report = tmp_path / "report"
    out = evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), db_dir=str(db_dir),
                              tables=str(tables), quiet=True, workers=1, report=str(report), **kw))
    rows = [json.loads(line) for line in open(report / "per_example.jsonl")]
    return out, rows


def make_db(db_dir, db_id: str, statements: list[str]):
    """A Spider-layout database <db_dir>/<db_id>/<db_id>.sqlite built from SQL statements."""
    path = db_dir / db_id / f"{db_id}.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def nested(depth: int, where: bool = False) -> str:
    if where:
        return "SELECT name FROM customer WHERE customer_id IN " + "(SELECT customer_id FROM customer WHERE " \
               "customer_id IN " * depth + "(SELECT 1)" + ")" * depth
    return "SELECT * FROM " + "(SELECT * FROM " * depth + "customer" + ")" * depth


# ------------------------------------------------------------------------------------------- deep nesting
@pytest.mark.parametrize("plug_value", [False, True])
def test_deeply_nested_predictions_count_wrong(demo_dir, tmp_path, plug_value):
    """Pins: a prediction with 150-400 nested `(SELECT * FROM` aborted the whole run with RecursionError (in the
    exact-match normalisation); now it counts wrong with its error recorded, and the other lines are scored."""
    preds = [nested(d) for d in (150, 250, 400)] + [nested(d, where=True) for d in (150, 400)]
    preds.append("SELECT name FROM customer")
    golds = ["SELECT name FROM customer\tshop"] * len(preds)
    out, rows = run_eval(tmp_path, golds, preds, demo_dir / "database", demo_dir / "tables.json",
                         plug_value=plug_value)
    assert out["count"] == len(preds)
    assert [r["em"] for r in rows] == [0] * 5 + [1] and [r["ex"] for r in rows] == [0] * 5 + [1]
    assert all(r["error"] for r in rows[:5])


def test_deeply_nested_gold_is_reported_not_a_crash(demo_dir, tmp_path, capsys):
    """Pins: the same RecursionError from a nested gold query (parsing, hardness); now reported, the run goes on.
    Since issue 26 the question still counts in EX (its EM is unscored and counted as such)."""
    golds = [nested(300) + "\tshop", "SELECT name FROM customer\tshop"]
    out, rows = run_eval(tmp_path, golds, [nested(300), "SELECT name FROM customer"], demo_dir / "database",
                         demo_dir / "tables.json")
    assert out["count"] == 2 and out["em"] == 1.0 and out["details"]["gold_unparsed"] == 1
    assert out["details"]["em_unscored"] == 1 and rows[0]["em"] is None and rows[0]["ex"] in (0, 1)
    assert "nested" in rows[0]["gold_unparsed"]


def test_parser_refuses_deep_nesting_with_a_parse_error(demo_dir):
    """Pins: parse_sql raised RecursionError (not ParseError) on deep nesting, which callers did not expect."""
    schema = Schema.from_sqlite(demo_dir / "database" / "shop" / "shop.sqlite")
    for sql in (nested(400), nested(400, where=True), " UNION ".join(["SELECT name FROM customer"] * 400)):
        with pytest.raises(ParseError, match="nested"):
            parse_sql(sql, schema)
    assert parse_sql(nested(4), schema)["from"]["table_units"][0][0] == "sql"  # ordinary nesting still parses


# ------------------------------------------------------------------------------------------- WAL databases
def test_wal_database_gold_against_itself_creates_nothing(db_copy, demo_dir, tmp_path):
    """Pins: opening a WAL-mode database read-only created -wal/-shm files beside it; database_files() took them for
    test-suite databases and gold-vs-gold scored 0.000."""
    shop = db_copy / "shop" / "shop.sqlite"
    conn = sqlite3.connect(shop)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    conn.close()
    before = sorted(os.listdir(shop.parent))
    assert before == ["shop.sqlite"]
    golds = [g + "\tshop" for g in SHOP_GOLD]
    out, _ = run_eval(tmp_path, golds, SHOP_GOLD, db_copy, demo_dir / "tables.json")
    assert out["ex"] == 1.0 and out["em"] == 1.0
    assert sorted(os.listdir(shop.parent)) == before
    Schema.from_sqlite(shop)
    assert sorted(os.listdir(shop.parent)) == before


def test_test_suite_databases_are_chosen_by_content(db_copy, demo_dir, tmp_path):
    """Pins: every file whose name contains `.sqlite` was taken for a test-suite database (a `-journal`, a notes
    file), and real SQLite files named otherwise were ignored; now a file is one when its header says so."""
    folder = db_copy / "shop"
    (folder / "shop.sqlite-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + b"\0" * 500)
    (folder / "notes.sqlite.txt").write_text("not a database")
    shutil.copy(folder / "shop.sqlite", folder / "shop_suite2.db")
    assert [p.name for p in database_files(folder / "shop.sqlite")] == ["shop.sqlite", "shop_suite2.db"]
    golds = [g + "\tshop" for g in SHOP_GOLD]
    out, _ = run_eval(tmp_path, golds, SHOP_GOLD, db_copy, demo_dir / "tables.json")
    assert out["ex"] == 1.0


# ------------------------------------------------------------------------------------------- memory
MEMORY_PREDS = ["SELECT randomblob(1000000000)", "SELECT zeroblob(1000000000)",
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000) "
                "SELECT randomblob(1000000) FROM c",
                "SELECT " + ", ".join(["zeroblob(30000000)"] * 60),
                "SELECT name FROM customer"]


# A child process's own peak RSS in kB, as an expression for its code: VmHWM belongs to the memory it runs in, while
# ru_maxrss also holds the high-water mark of the pre-exec copy of the process that forked it.
OWN_PEAK_KB = ("int([x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0].split()[1]) "
               "if sys.platform.startswith('linux') else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the fold are Linux's")
def test_a_childs_peak_is_its_own_not_its_forking_parents():
    """Pins the measurement of the bound below: with ru_maxrss a child started from a parent holding 1.2 GB reported
    1.2 GB however little it used (fresh-clone CI failed the bound at 1115 MB after in-process training tests)."""
    held = bytearray(1200 << 20)
    held[::4096] = b"x" * len(held[::4096])  # resident, not only reserved
    code = f"import resource, sys; print({OWN_PEAK_KB})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) < 300 * 1024 < len(held) // 1024


def test_huge_results_count_wrong_and_memory_stays_bounded(demo_dir, tmp_path):
    """Pins: `SELECT randomblob(1e9)` reached 2-6.6 GB RSS, 3000 rows of 1 MB reached 3 GB, and `zeroblob(1e9)`
    under a memory cap ended the whole run with MemoryError. Now each counts wrong as "result too large" and the
    evaluating process stays under 1 GB (run in a child process capped at 3 GB of address space). Its peak is the
    child's own VmHWM: ru_maxrss also counts the memory of the pytest process it was forked from (Linux folds the
    pre-exec copy's high-water mark in), which failed this test at 1115 MB after in-process training tests."""
    (tmp_path / "gold.sql").write_text("SELECT name FROM customer\tshop\n" * len(MEMORY_PREDS))
    (tmp_path / "pred.sql").write_text("\n".join(MEMORY_PREDS) + "\n")
    code = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from sqltune.config import EvalConfig
from sqltune.eval.evaluate import evaluate
out = evaluate(EvalConfig(pred={str(tmp_path / 'pred.sql')!r}, gold={str(tmp_path / 'gold.sql')!r},
                          db_dir={str(demo_dir / 'database')!r}, tables={str(demo_dir / 'tables.json')!r},
                          etype="exec", quiet=True, workers=1, report={str(tmp_path / 'r')!r}))
print(json.dumps([out["ex"], {OWN_PEAK_KB}]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ex, maxrss_kb = json.loads(done.stdout.strip().splitlines()[-1])
    assert ex == pytest.approx(1 / len(MEMORY_PREDS))
    assert maxrss_kb < 1024 * 1024, f"peak RSS {maxrss_kb / 1024:.0f} MB"
    rows = [json.loads(line) for line in open(tmp_path / "r" / "per_example.jsonl")]
    for row in rows[:-1]:
        assert row["ex"] == 0 and "result too large" in row["error"], row["error"]
        assert row["failure"] == "execution: result too large"


# ------------------------------------------------------------------------------------------- broken databases
def test_unreadable_databases_are_named_once_and_counted(db_copy, demo_dir, tmp_path, capsys):
    """Pins: a corrupt or truncated .sqlite ended the run with "internal error: DatabaseError: file is not a
    database" naming no database, and a 0-byte one silently dropped its questions (rc 0, EX 1.0 over the rest).
    Now each unreadable database is named once, its questions count wrong in EX and are listed, the run ends."""
    (db_copy / "shop" / "shop.sqlite").write_bytes(b"")
    school = db_copy / "school" / "school.sqlite"
    school.write_bytes(school.read_bytes()[:5000])
    hall = db_copy / "concert_hall" / "concert_hall.sqlite"
    hall.write_bytes(b"garbage " * 3000)
    golds = ["SELECT name FROM customer\tshop", "SELECT count(*) FROM customer\tshop",
             "SELECT count(*) FROM student\tschool", "SELECT name FROM singer\tconcert_hall"]
    preds = [g.split("\t")[0] for g in golds]
    out, rows = run_eval(tmp_path, golds, preds, db_copy, demo_dir / "tables.json")
    err = capsys.readouterr().err
    assert out["count"] == 4 and out["ex"] == 0.0 and out["em"] == 1.0
    assert all(r["ex"] == 0 and "database unreadable" in r["error"] for r in rows)
    assert out["details"]["unreadable_db"] == ["concert_hall", "school", "shop"]
    for name in ("shop", "school", "concert_hall"):  # named once, even with quiet=True (quiet drops the table)
        assert sum(f"database {name} " in line for line in err.splitlines()) == 1, err
    assert main(["evaluate", "--gold", str(tmp_path / "gold.sql"), "--pred", str(tmp_path / "pred.sql"),
                 "--db_dir", str(db_copy), "--tables", str(demo_dir / "tables.json"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    for name in ("shop", "school", "concert_hall"):
        assert sum(f"database {name} " in line for line in err.splitlines()) == 1, err
    # with --skip_missing_db they are left out like absent databases, and counted as left out
    out, rows = run_eval(tmp_path, golds, preds, db_copy, demo_dir / "tables.json", skip_missing_db=True)
    assert out["count"] == 0 and out["skipped_missing_db"] == 4 and len(rows) == 4
    report = (tmp_path / "report" / "report.md").read_text()
    assert "4 left out" in report and "shop" in report


def test_shared_databases_stay_byte_identical(db_copy, demo_dir, tmp_path):
    """Pins: a read-only open of a WAL database still wrote beside it; nothing in the folder may change."""
    digest = {p: p.read_bytes() for p in db_copy.rglob("*") if p.is_file()}
    golds = [g + "\tshop" for g in SHOP_GOLD]
    run_eval(tmp_path, golds, ["SELECT 1", "PRAGMA journal_mode=WAL", "CREATE TABLE x (a)"], db_copy,
             demo_dir / "tables.json")
    assert {p: p.read_bytes() for p in db_copy.rglob("*") if p.is_file()} == digest


# ------------------------------------------------------------------------------------------- lines
def test_byte_order_marks_are_stripped(demo_dir, tmp_path):
    """Pins: a BOM in the gold file silently dropped question 1 (count 2 of 3); a BOM in the prediction file made
    question 1 wrong."""
    golds = [g + "\tshop" for g in SHOP_GOLD]
    out, rows = run_eval(tmp_path, golds, SHOP_GOLD, demo_dir / "database", demo_dir / "tables.json",
                         gold_text="\ufeff" + "\n".join(golds) + "\n", pred_text="\ufeff" + "\n".join(SHOP_GOLD))
    assert out["count"] == 3 and out["ex"] == 1.0 and out["em"] == 1.0
    assert rows[0]["gold"] == SHOP_GOLD[0] and rows[0]["pred"] == SHOP_GOLD[0]


@pytest.mark.parametrize("odd", ["\u2028", "\x0c", "\x85", "\r", "\u2029", "\x1c"])
def test_unicode_line_breaks_inside_a_line_keep_the_line_count(demo_dir, tmp_path, odd):
    """Pins: U+2028, form feed, NEL or a lone CR inside a prediction line split it in two (str.splitlines), which
    gave a line-count error; lines split on \\n only (after CRLF -> LF)."""
    golds = [g + "\tshop" for g in SHOP_GOLD]
    preds = [SHOP_GOLD[0], f"SELECT count(*){odd} FROM product", SHOP_GOLD[2]]
    golds[1] = f"SELECT count(*) FROM product WHERE name != 'a{odd}'\tshop"
    out, rows = run_eval(tmp_path, golds, preds, demo_dir / "database", demo_dir / "tables.json",
                         pred_text="\r\n".join(preds) + "\r\n", gold_text="\r\n".join(golds))
    assert out["count"] == 3 and rows[0]["ex"] == 1 and rows[2]["ex"] == 1
    assert odd in rows[1]["pred"] and odd in rows[1]["gold"]


def test_gold_line_splits_on_its_last_tab(demo_dir, tmp_path):
    """Pins: a TAB inside a gold string literal made the line `expected SQL<TAB>db_id` (contract 1: split on the
    last TAB); the SQL reads back unchanged and the prediction keeps its own TAB too."""
    sql = "SELECT count(*) FROM customer WHERE name != 'a\tb'"
    out, rows = run_eval(tmp_path, [sql + "\tshop"], [sql], demo_dir / "database", demo_dir / "tables.json")
    assert rows[0]["gold"] == sql and rows[0]["pred"] == sql
    assert out["ex"] == 1.0 and out["em"] == 1.0
    db_dir = tmp_path / "tabs_db"
    make_db(db_dir, "tabs", ["CREATE TABLE t (name TEXT)", "INSERT INTO t VALUES ('a\tb'), ('a b')"])
    literal = "SELECT name FROM t WHERE name = 'a\tb'"
    out, rows = run_eval(tmp_path, [literal + "\ttabs"], [literal + "\ttabs"], db_dir, "", etype="exec")
    assert out["ex"] == 1.0 and rows[0]["pred"] == literal  # a trailing <TAB>db_id is dropped, inner TABs kept


def test_undecodable_gold_file_is_one_line(demo_dir, tmp_path, capsys):
    """Pins: a gold file that is not UTF-8 ended in a UnicodeDecodeError traceback."""
    (tmp_path / "gold.sql").write_bytes(b"SELECT name FROM customer WHERE name = '\xff'\tshop\n")
    (tmp_path / "pred.sql").write_text("SELECT 1\n")
    assert main(["evaluate", "--gold", str(tmp_path / "gold.sql"), "--pred", str(tmp_path / "pred.sql"),
                 "--db_dir", str(demo_dir / "database"), "--tables", str(demo_dir / "tables.json")]) == 2
    err = capsys.readouterr().err
    assert "UTF-8" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------- report
def test_failure_kinds_count_each_wrong_answer_once(demo_dir, tmp_path):
    """Pins: the failure-kind table added up to more than the wrong answers (24 for 23): EX failures and EM-only
    failures were one list with no total. Now the table counts each question once, under its first failure, and
    says how many were wrong on EX and how many only on EM."""
    golds = [g + "\tshop" for g in SHOP_GOLD] * 2
    preds = ["SELECT nme FROM customer", "CREATE TABLE evil (a)", "SELECT city FROM customer WHERE age > 31",
             "SELECT name FROM customer", "SELECT count(product_id) FROM product", "SELECT city FROM customer"]
    out, rows = run_eval(tmp_path, golds, preds, demo_dir / "database", demo_dir / "tables.json")
    kinds = [r["failure"] for r in rows]
    assert rows[4]["ex"] == 1 and rows[4]["em"] == 0 and kinds[4].startswith("exact match")
    assert kinds[1] == "write refused: databases are read-only"
    wrong = sum(1 for r in rows if r["ex"] == 0 or r["em"] == 0)
    report = (tmp_path / "report" / "report.md").read_text()
    section = report.split("## Most common failure kinds")[1].split("##")[0]
    counts = [int(line.rsplit("|", 2)[1]) for line in section.splitlines() if line.startswith("| ") and
              not line.startswith("| kind")]
    assert sum(counts) == wrong == len([k for k in kinds if k])
    ex_wrong = sum(1 for r in rows if r["ex"] == 0)
    assert f"{ex_wrong} wrong in EX" in section and f"{wrong - ex_wrong} right in EX but not exact match" in section


def test_write_refused_label(demo_dir, tmp_path):
    """Pins: a base model writing `CREATE TABLE` was labelled "execution error: not authorized"."""
    golds = ["SELECT name FROM customer\tshop"] * 4
    preds = ["CREATE TABLE t (a)", "INSERT INTO customer VALUES (1, 'a', 'b', 2)",
             "WITH x AS (SELECT 1) DELETE FROM customer", "PRAGMA table_info(customer)"]
    _, rows = run_eval(tmp_path, golds, preds, demo_dir / "database", demo_dir / "tables.json")
    kinds = [r["failure"] for r in rows]
    assert kinds[:3] == ["write refused: databases are read-only"] * 3
    assert kinds[3] == "refused: only SELECT statements run"


def test_partial_f1_convention_is_explained(demo_dir, tmp_path):
    """Pins: report.md printed partial-match F1 = 1.000 where accuracy and recall are 0.000 with no word on why
    (the official convention, kept)."""
    run_eval(tmp_path, ["SELECT name FROM customer\tshop"], ["SELECT name FROM customer"], demo_dir / "database",
             demo_dir / "tables.json")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "F1 is 1.000 where accuracy and recall are both 0.000" in report
