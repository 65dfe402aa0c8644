"""The GRPO reward (sqltune/train/reward.py): each completion's SQL, read as predict reads it, run in the sandbox
against the gold as EX scores it: match / runs but wrong / fails / no SQL / hostile, other shapes by flag, a gold
that fails gives no reward, and one pool of workers serves every call."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sqltune.config import TrainConfig
from sqltune.errors import SqltuneError
from sqltune.train.reward import SqlReward, outcome

GOLD = "SELECT name FROM singer WHERE age > 30"


@pytest.fixture
def db(tmp_path) -> Path:
    """A Spider-layout database: <db_dir>/concert/concert.sqlite with one small table."""
    path = tmp_path / "database" / "concert" / "concert.sqlite"
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, age INTEGER);"
                       "INSERT INTO singer VALUES (1, 'Ann', 41), (2, 'Bob', 25), (3, 'Cid', 33);")
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def reward():
    r = SqlReward(end="<|im_end|>", timeout=1.0, workers=2)
    yield r
    r.close()


def long_like(n: int = 600_000, m: int = 40_000) -> str:
    """One SQLite step of about n*m comparisons, which the progress handler cannot interrupt: only killing the
    worker stops it (tests/test_sandbox.py's hostile query)."""
    return (f"SELECT name FROM singer WHERE replace(hex(zeroblob({n // 2})), '00', 'aa') LIKE "
            f"'%' || replace(hex(zeroblob({m // 2})), '00', 'aa') || 'b%'")


def score(reward, db, completions, gold=GOLD):
    return reward(prompts=["p"] * len(completions), completions=completions, gold=[gold] * len(completions),
                  db_path=[str(db)] * len(completions))


def test_match_runs_fails_and_no_sql_get_the_default_shape(reward, db):
    completions = [
        "SELECT name FROM singer WHERE age > 30<|im_end|>",  # the gold's result: match
        "```sql\nSELECT name FROM singer WHERE age >= 31\n```",  # another query, the same result
        "SELECT name FROM singer",  # runs, wrong result
        "SELECT nme FROM singer",  # an error
        "I cannot answer that.",  # no SQL in it
        "",  # nothing at all
    ]
    assert score(reward, db, completions) == [1.0, 1.0, 0.1, 0.0, 0.0, 0.0]


def test_the_sql_is_read_as_predict_reads_it(reward, db):
    """Cut at the template's end marker and at a made-up next turn: the text after either is never run."""
    completions = ["SELECT name FROM singer WHERE age > 30<|im_end|>SELECT nothing",
                   "SELECT name FROM singer WHERE age > 30\n###Input:\nnext?\n\n###Response:SELECT 1"]
    assert score(reward, db, completions) == [1.0, 1.0]


def test_other_shapes_by_flag(db):
    r = SqlReward("2,0.5,-1,-2", timeout=1.0, workers=1)
    try:
        assert score(r, db, [GOLD, "SELECT name FROM singer", "SELECT nme FROM singer", "no sql"]) == \
            [2.0, 0.5, -1.0, -2.0]
    finally:
        r.close()
    three = SqlReward("1,0,-1", timeout=1.0, workers=1)
    try:  # without a fourth value, no SQL is a failure
        assert score(three, db, ["no sql", "SELECT nme FROM singer"]) == [-1.0, -1.0]
    finally:
        three.close()


@pytest.mark.parametrize("shape", ["1,0.1", "1,0.1,0,0,0", "a,b,c", "1,nan,0", ""])
def test_a_bad_shape_is_one_line(shape):
    with pytest.raises(SqltuneError, match="--reward_shape must be 3 or 4 numbers"):
        TrainConfig(reward_shape=shape)


def test_hostile_queries_fail_and_change_nothing(reward, db):
    """A query that would run for minutes in one SQLite step is cut by the sandbox (its worker killed a second past
    --reward_timeout); a recursive query that never ends times out; writes are refused. All fail, the database is
    unchanged and the next completion is scored by a fresh worker."""
    before = db.read_bytes()
    completions = [long_like(),
                   "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
                   "DELETE FROM singer", "DROP TABLE singer", "ATTACH DATABASE 'x.db' AS x", GOLD]
    assert score(reward, db, completions) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert db.read_bytes() == before
    assert reward.sandbox.killed >= 1


def test_a_failing_gold_gives_no_reward(reward, db):
    """Pins: a gold query that fails (a broken record) would teach that nothing works on its question; its
    completions get None (TRL leaves them out of the advantages) and are counted."""
    out = score(reward, db, ["SELECT name FROM singer", GOLD], gold="SELECT missing FROM singer")
    assert out == [None, None] and reward.counts["gold_failed"] == 2


def test_figures_are_logged_per_call(reward, db):
    logged = {}
    reward(prompts=["p"] * 4, completions=[GOLD, GOLD, "SELECT name FROM singer", "x"], gold=[GOLD] * 4,
           db_path=[str(db)] * 4, log_metric=lambda name, value: logged.setdefault(name, value))
    assert logged["sql/match"] == 0.5 and logged["sql/runs"] == 0.25 and logged["sql/no_sql"] == 0.25
    assert logged["sql/fails"] == 0.0 and logged["sql/gold_failed"] == 0.0


def test_one_pool_of_workers_serves_every_call(reward, db):
    """No process is started per completion: the workers of the first call score the second call too."""
    score(reward, db, [GOLD] * 4)
    pids = sorted(s.process.pid for s in reward.sandbox._slots if s.process is not None)
    score(reward, db, ["SELECT name FROM singer"] * 4)
    assert sorted(s.process.pid for s in reward.sandbox._slots if s.process is not None) == pids
    assert 0 < len(pids) <= 2


def test_bird_scores_with_birds_rule(db):
    """For a BIRD dataset the reward is BIRD's EX (sets of rows, the SQL as written): a column order Spider
    accepts is wrong there."""
    gold, swapped = "SELECT name, age FROM singer WHERE age > 30", "SELECT age, name FROM singer WHERE age > 30"
    spider, bird = SqlReward(timeout=1.0, workers=1), SqlReward(timeout=1.0, workers=1, bird=True)
    try:
        assert score(spider, db, [gold, swapped], gold=gold) == [1.0, 1.0]
        assert score(bird, db, [gold, swapped], gold=gold) == [1.0, 0.1]
    finally:
        spider.close()
        bird.close()


def test_outcome_outside_a_worker_matches(db):
    """The task function itself, called directly (no worker): what the sandbox runs per completion."""
    assert outcome((str(db), GOLD, GOLD, False)) == "match"
    assert outcome((str(db), "", GOLD, False)) == "no_sql"


def test_workers_that_die_on_every_completion_stop_training(reward, db, monkeypatch):
    """Pins: a sandbox whose workers cannot run anything (they die at start) scored every completion as a failure,
    so training went on learning nothing; now it stops with one line."""
    def dying(fn, items, key=None, on_fail=None, progress=None):
        return [on_fail(item, "worker stopped (work; exit code 1: the memory bound is the usual cause)", "work", 0)
                for item in items]

    monkeypatch.setattr(reward.sandbox, "map", dying)
    with pytest.raises(SqltuneError, match="sandbox workers stopped on all 2 completions"):
        score(reward, db, [GOLD, GOLD])
