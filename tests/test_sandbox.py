"""The sandbox that runs every SQL query sqltune runs (issue 26): hard time limits by killing worker processes,
bounded memory and results, no temp files, workers capped at the work. Each test names the finding it pins; each
failed (or ran for minutes) on the executor before the sandbox.

The time bounds asserted here are generous upper bounds on a hang (a query that ran for minutes before), not
measurements of speed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sqltune.config import EvalConfig
from sqltune.eval.evaluate import evaluate
from sqltune.sandbox import Killed, Limits, QueryError, Sandbox, count_rows, default_workers
from sqltune.sandbox.readonly import connect
from sqltune.testing import alive, descendants

ROOT = Path(__file__).resolve().parents[1]


def long_like(n: int = 600_000, m: int = 40_000) -> str:
    """A LIKE over an n-character string with an m-character literal: one SQLite step of about n*m comparisons
    (~30 s here at the defaults; SQLite refuses patterns over 50,000 bytes), which its progress handler cannot
    interrupt."""
    return (f"SELECT name FROM customer WHERE replace(hex(zeroblob({n // 2})), '00', 'aa') LIKE "
            f"'%' || replace(hex(zeroblob({m // 2})), '00', 'aa') || 'b%'")


@pytest.fixture
def db_copy(demo_dir, tmp_path):
    target = tmp_path / "database"
    shutil.copytree(demo_dir / "database", target)
    return target


def files_digest(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_eval(tmp_path, golds, preds, db_dir, tables, **kw):
    (tmp_path / "gold.sql").write_text("".join(g + "\n" for g in golds))
    (tmp_path / "pred.sql").write_text("".join(p + "\n" for p in preds))
    cfg = dict(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), db_dir=str(db_dir),
               tables=str(tables), quiet=True, workers=1, report=str(tmp_path / "report"))
    out = evaluate(EvalConfig(**{**cfg, **kw}))
    import json

    return out, [json.loads(line) for line in open(tmp_path / "report" / "per_example.jsonl")]


def test_a_query_that_one_step_keeps_busy_is_killed_at_its_deadline(db_copy, demo_dir, tmp_path):
    """Pins: a LIKE over a long string ran 16-70 s under `--timeout 2` (the progress handler runs only between
    SQLite steps). Now the worker is killed a second after the timeout and the question counts wrong with the
    reason; the questions after it are scored by a fresh worker."""
    before = files_digest(db_copy)
    started = time.monotonic()
    out, rows = run_eval(tmp_path, ["SELECT name FROM customer\tshop"] * 3,
                         ["SELECT name FROM customer", long_like(), "SELECT name FROM customer"],
                         db_copy, demo_dir / "tables.json", timeout=1)
    assert time.monotonic() - started < 20  # the old executor ran this query for about 30 s
    assert [r["ex"] for r in rows] == [1, 0, 1] and "timed out after 1 s" in rows[1]["error"]
    assert out["count"] == 3 and files_digest(db_copy) == before


def test_sigterm_stops_evaluation_and_its_workers(db_copy, demo_dir, tmp_path):
    """Pins: a runaway query ignored SIGTERM (only kill -9 stopped it). Now SIGTERM ends `sqltune evaluate`
    within seconds, with one line, and no worker outlives it."""
    (tmp_path / "gold.sql").write_text("SELECT name FROM customer\tshop\n")
    (tmp_path / "pred.sql").write_text(long_like(2_000_000) + "\n")
    cmd = [sys.executable, "-m", "sqltune", "evaluate", "--pred", str(tmp_path / "pred.sql"), "--gold",
           str(tmp_path / "gold.sql"), "--db_dir", str(db_copy), "--tables", str(demo_dir / "tables.json"),
           "--etype", "exec", "--timeout", "600"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers: set[int] = set()
    deadline = time.monotonic() + 30
    while not workers and time.monotonic() < deadline:  # wait until a worker runs the query
        time.sleep(0.2)
        workers = descendants(proc.pid)
    assert workers, "no worker started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5
    assert proc.returncode != 0 and "Traceback" not in err
    for _ in range(50):
        if not any(Path(f"/proc/{pid}").exists() for pid in workers):
            break
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


def test_every_cell_counts_against_the_result_bound(db_copy):
    """Pins: only text and blob bytes were counted, so 100k rows x 500 numeric columns (1.99 GB) passed a 64 MB
    bound. Now every cell counts: 20k rows x 100 integers is far over 8 MB."""
    columns = ", ".join(f"x + {i}" for i in range(100))
    sql = f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 20000) SELECT {columns} FROM c"
    with Sandbox(1, Limits(timeout=10, max_bytes=8 << 20)) as sandbox:
        with pytest.raises(QueryError, match="result too large"):
            sandbox.call(count_rows, (str(db_copy / "shop" / "shop.sqlite"), sql))


def test_sorts_spill_to_memory_never_to_a_temp_file(db_copy):
    """Pins: an ORDER BY spilled a 2.8 GB temporary file. Connections keep temporary storage in memory
    (temp_store = MEMORY, 2), bounded by SQLite's heap limit."""
    conn = connect(db_copy / "shop" / "shop.sqlite")
    conn.set_authorizer(None)
    assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2
    conn.close()


def test_a_worker_that_outgrows_its_memory_bound_is_reported_not_fatal(db_copy):
    """A query that needs more memory than the worker may have fails with a reason; the sandbox goes on."""
    sql = "SELECT group_concat(hex(zeroblob(100000))) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1" \
          " FROM c LIMIT 20000) SELECT x FROM c)"
    db = str(db_copy / "shop" / "shop.sqlite")
    with Sandbox(1, Limits(timeout=20, max_bytes=1 << 30, memory_bytes=256 << 20)) as sandbox:
        with pytest.raises(QueryError):
            sandbox.call(count_rows, (db, sql))
        assert sandbox.call(count_rows, (db, "SELECT name FROM customer")) > 0


def test_workers_are_capped_at_the_cores_and_the_work():
    """Pins: `--workers 150` started ~110 processes. Never more than the cores, nor more than the work."""
    cores = os.cpu_count() or 1
    assert default_workers(150, 1000) == cores
    assert default_workers(150, 1) == 1 and default_workers(0, 3) == min(cores, 3)


def test_a_killed_call_names_its_step(db_copy):
    """The parent kills a call past its deadline and says which step it was on (the vote uses it)."""
    with Sandbox(1, Limits(timeout=0.5)) as sandbox:
        with pytest.raises(Killed, match="timed out after 0.5 s") as caught:
            sandbox.call(count_rows, (str(db_copy / "shop" / "shop.sqlite"), long_like()))
        assert caught.value.phase == "query" and sandbox.killed == 1


def test_plug_value_tries_a_bounded_number_of_fillings(db_copy, demo_dir, tmp_path):
    """Pins: `--plug_value` on a prediction with 40 literal comparisons never finished (2^80 fillings). Now at
    most PLUG_MAX fillings are tried, within the question's timeout."""
    pred = "SELECT name FROM customer WHERE " + " OR ".join(f"age = {i}" for i in range(40))
    started = time.monotonic()
    out, rows = run_eval(tmp_path, ["SELECT name FROM customer WHERE age > 30 OR age < 20\tshop"], [pred],
                         db_copy, demo_dir / "tables.json", plug_value=True, timeout=5)
    assert time.monotonic() - started < 30 and rows[0]["ex"] in (0, 1)


def test_a_prediction_longer_than_the_bound_is_wrong_with_its_reason(db_copy, demo_dir, tmp_path):
    """Pins: a 55-MB prediction line took > 180 s and 3 GB in parsing before any timeout started. A prediction
    over MAX_SQL_BYTES is wrong in EX and EM with a named reason, never parsed or run."""
    pred = "SELECT name FROM customer WHERE " + " OR ".join(["age = 1"] * 20_000)  # ~200 kB
    out, rows = run_eval(tmp_path, ["SELECT name FROM customer\tshop"], [pred], db_copy, demo_dir / "tables.json")
    assert rows[0]["ex"] == 0 and rows[0]["em"] == 0 and "prediction too long" in rows[0]["error"]


def test_ex_counts_a_gold_the_parser_cannot_read(db_copy, demo_dir, tmp_path, capsys):
    """Pins: EX left out every question whose gold the exact-match parser cannot read (here `||`), also with
    --etype exec: 4 questions, the 2 with such gold answered wrong gave EX 1.000 on a count of 2. Now EX is 0.5
    on 4, EM is over the 2 it can score, and the count of the others is said even when quiet."""
    golds = ["SELECT name FROM customer\tshop", "SELECT count(*) FROM product\tshop",
             "SELECT name || city FROM customer\tshop", "SELECT city || name FROM customer\tshop"]
    preds = ["SELECT name FROM customer", "SELECT count(*) FROM product", "SELECT name FROM customer",
             "SELECT city FROM customer"]
    for etype in ("exec", "all"):
        out, rows = run_eval(tmp_path, golds, preds, db_copy, demo_dir / "tables.json", etype=etype)
        assert out["count"] == 4 and out["ex"] == 0.5
        assert out["details"]["gold_unparsed"] == 2
    assert out["em"] == 1.0 and out["details"]["em_unscored"] == 2
    assert out["details"]["scores"]["all"]["em_count"] == 2
    assert "2 gold queries cannot be read by the exact-match parser" in capsys.readouterr().err


def test_evaluation_of_hostile_lines_ends_and_scores_the_real_answers(db_copy, demo_dir, tmp_path):
    """The issue's closing check, at small sizes: hostile lines (a long LIKE, a huge wide result, writes, a long
    line) among real answers: the run ends, changes no file, and scores the real answers right."""
    before = files_digest(db_copy)
    hostile = [long_like(), "DROP TABLE customer",
               "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 300000) "
               "SELECT x, x, x, x, x, x, x, x FROM c", "SELECT 1 " + " " * 200_000]
    real = ["SELECT name FROM customer", "SELECT count(*) FROM product"]
    golds = ["SELECT name FROM customer\tshop", "SELECT count(*) FROM product\tshop"] * 3
    preds = [real[0], hostile[0], real[0], hostile[1], real[0], hostile[2]]
    started = time.monotonic()
    out, rows = run_eval(tmp_path, golds + ["SELECT name FROM customer\tshop"], preds + [hostile[3]], db_copy,
                         demo_dir / "tables.json", timeout=1, etype="exec", max_result_mb=4)
    assert time.monotonic() - started < 30
    assert [r["ex"] for r in rows] == [1, 0, 1, 0, 1, 0, 0]
    assert files_digest(db_copy) == before


def test_a_gold_query_killed_in_a_broken_database_is_one_warning(tmp_path, demo_dir, capsys):
    """Pins (with the fix in evaluate's warnings): a database whose data pages are damaged gave one warning per
    question ("database disk image is malformed"); now one line names the database and its count."""
    db_dir = tmp_path / "database"
    shutil.copytree(demo_dir / "database", db_dir)
    path = db_dir / "shop" / "shop.sqlite"
    conn = sqlite3.connect(path)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(path.read_bytes())
    data[page:] = b"\xff" * (len(data) - page)  # the schema page is whole, every table page is garbage
    path.write_bytes(bytes(data))
    golds = ["SELECT name FROM customer\tshop", "SELECT count(*) FROM product\tshop"] * 3
    (tmp_path / "gold.sql").write_text("".join(g + "\n" for g in golds))
    (tmp_path / "pred.sql").write_text("SELECT 1\n" * 6)
    evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), db_dir=str(db_dir),
                        tables=str(demo_dir / "tables.json"), workers=1, etype="exec"))
    err = capsys.readouterr().err
    assert err.count("shop") == 1 and "6 questions" in err
