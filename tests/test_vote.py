"""Execution-guided voting and retry: hand-made candidates against a small database (no model), then candidate
generation on the tiny model (N samples + greedy, log-probabilities of the model's own distribution)."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest

from sqltune.config import EvalConfig
from sqltune.errors import SqltuneError
from sqltune.infer.vote import choose_retry, make_executor, signature, vote
from sqltune.io import read_jsonl


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "concert" / "concert.sqlite"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, country TEXT);
        INSERT INTO singer VALUES (1, 'Ann', 52, 'France'), (2, 'Bo', 29, 'France'), (3, 'Cy', 41, 'Spain'),
                                  (4, 'Di', 35, 'Peru');
    """)
    conn.commit()
    conn.close()
    return path


@pytest.fixture()
def executor():
    ex = make_executor(timeout=5.0, max_rows=1000)
    yield ex
    ex.close()


def cands(*items, greedy_first=True):
    """(sql, logprob) pairs as candidates; the first is the greedy one unless greedy_first is False."""
    return [{"sql": sql, "logprob": lp, "source": "greedy" if i == 0 and greedy_first else "sample", "text": sql}
            for i, (sql, lp) in enumerate(items)]


def test_different_sql_with_the_same_result_group_together(db, executor):
    sql, rec = vote(cands(("SELECT name FROM singer WHERE age > 40", -3.0),
                          ("SELECT name FROM singer WHERE NOT age <= 40", -5.0),
                          ("SELECT name FROM singer", -1.0)), db, executor)
    assert [g["size"] for g in rec["groups"]] == [2, 1]
    assert rec["winner"] == 0 and sql == "SELECT name FROM singer WHERE age > 40"
    members = rec["candidates"]
    assert members[0]["group"] == members[1]["group"] == 0 and members[2]["group"] == 1
    assert members[0]["result"]["signature"] == members[1]["result"]["signature"]
    assert members[0]["result"]["rows"] == 2 and members[0]["result"]["cols"] == 1


def test_column_order_does_not_split_a_group(db, executor):
    _, rec = vote(cands(("SELECT name, age FROM singer", -2.0), ("SELECT age, name FROM singer", -2.5),
                        ("SELECT name FROM singer", -0.1)), db, executor)
    assert [g["members"] for g in rec["groups"]] == [[0, 1], [2]]


def test_one_and_one_point_zero_are_the_same_answer(db, executor):
    """EX compares values with ==, so count(*) = 4 and sum(1.0) = 4.0 are one answer."""
    _, rec = vote(cands(("SELECT count(*) FROM singer", -1.0), ("SELECT sum(1.0) FROM singer", -2.0)), db, executor)
    assert [g["size"] for g in rec["groups"]] == [2]


def test_distinct_is_dropped_as_the_evaluator_does(db, executor):
    pair = cands(("SELECT country FROM singer", -1.0), ("SELECT DISTINCT country FROM singer", -2.0))
    assert len(vote(pair, db, executor)[1]["groups"]) == 1
    assert len(vote(pair, db, executor, keep_distinct=True)[1]["groups"]) == 2


def test_row_order_counts_when_most_candidates_order_their_rows(db, executor):
    """Three of four candidates have ORDER BY: the gold query probably has one too, so rows are compared in order
    (as EX would then), also against the candidate without ORDER BY."""
    _, rec = vote(cands(("SELECT name FROM singer ORDER BY age", -1.0),
                        ("SELECT name FROM singer ORDER BY age DESC", -1.0),
                        ("SELECT name FROM singer ORDER BY age ASC", -1.0),
                        ("SELECT name FROM singer", -1.0)), db, executor)
    assert [g["members"] for g in rec["groups"]] == [[0, 2], [1], [3]]


def test_the_same_rows_are_one_answer_with_or_without_order_by(db, executor):
    """Pins a wrong answer seen on Spider dev (v03, "the conductor with the most years of work"): three candidates
    `WHERE year = (SELECT max(...))` and three `ORDER BY year DESC LIMIT 1` all returned the right single row and
    all score EX 1, but a candidate's own ORDER BY split them into two groups of three, and a wrong group of three
    won on log-probability. EX takes row order from the gold, so one row (or none) is the same answer either way."""
    right = [("SELECT name FROM singer WHERE age = (SELECT max(age) FROM singer)", -2.0),
             ("SELECT name FROM singer WHERE age = (SELECT max(age) FROM singer)", -2.0),
             ("SELECT name FROM singer ORDER BY age DESC LIMIT 1", -2.0),
             ("SELECT name FROM singer ORDER BY age DESC LIMIT 1", -2.0)]
    wrong = [("SELECT name FROM singer ORDER BY age LIMIT 1", -0.1)] * 3
    sql, rec = vote(cands(*wrong, *right), db, executor)
    assert sorted(g["size"] for g in rec["groups"]) == [3, 4]
    assert sql in {s for s, _ in right} and rec["rows_in_order"] is True
    _, empty = vote(cands(("SELECT name FROM singer WHERE age > 90", -1.0),
                          ("SELECT name FROM singer WHERE age > 90 ORDER BY age", -1.0)), db, executor)
    assert [g["size"] for g in empty["groups"]] == [2]


def test_rows_compare_as_a_bag_when_most_candidates_do_not_order(db, executor):
    """Most candidates have no ORDER BY: the gold probably has none, so EX would compare bags of rows, and a
    candidate that orders the same rows is the same answer."""
    _, rec = vote(cands(("SELECT name FROM singer", -1.0), ("SELECT name FROM singer WHERE age > 0", -1.0),
                        ("SELECT name FROM singer ORDER BY age", -1.0)), db, executor)
    assert [g["members"] for g in rec["groups"]] == [[0, 1, 2]] and rec["rows_in_order"] is False


def test_largest_group_beats_a_more_probable_single(db, executor):
    sql, rec = vote(cands(("SELECT name FROM singer WHERE country = 'France'", -0.5),
                          ("SELECT name FROM singer WHERE age < 30", -4.0),
                          ("SELECT name FROM singer WHERE id = 2", -6.0)), db, executor)
    assert sql == "SELECT name FROM singer WHERE age < 30"  # the most probable member of the group of two
    assert rec["chosen"] == 1 and rec["fallback"] is None


def test_tie_goes_to_the_larger_summed_log_probability(db, executor):
    sql, rec = vote(cands(("SELECT name FROM singer WHERE age > 50", -1.0),  # group A: -1 + -9 = -10
                          ("SELECT name FROM singer WHERE id = 3", -2.0),  # group B: -2 + -3 = -5
                          ("SELECT name FROM singer WHERE id = 1", -9.0),
                          ("SELECT name FROM singer WHERE age = 41", -3.0)), db, executor)
    assert [(g["size"], g["logprob_sum"]) for g in rec["groups"]] == [(2, -10.0), (2, -5.0)]
    assert rec["winner"] == 1 and sql == "SELECT name FROM singer WHERE id = 3"


def test_failing_candidates_are_dropped(db, executor):
    """Three copies of the same broken query do not outvote one that runs."""
    sql, rec = vote(cands(("SELECT nme FROM singer", -0.1), ("SELECT nme FROM singer", -0.1),
                          ("SELECT nme FROM singer", -0.1), ("SELECT name FROM singer", -7.0)), db, executor)
    assert sql == "SELECT name FROM singer" and len(rec["groups"]) == 1
    assert all("no such column" in c["error"] and c["group"] is None for c in rec["candidates"][:3])


def test_writes_are_refused_and_count_as_failures(db, executor):
    sql, rec = vote(cands(("SELECT name FROM singer WHERE id = 9", -5.0),
                          ("DELETE FROM singer", -0.1), ("DROP TABLE singer", -0.1),
                          ("INSERT INTO singer VALUES (5, 'Ed', 20, 'Chad')", -0.1),
                          ("CREATE TABLE t (x)", -0.1)), db, executor)
    assert sql == "SELECT name FROM singer WHERE id = 9"  # an empty result still runs
    assert all(c["error"] for c in rec["candidates"][1:])
    assert sqlite3.connect(db).execute("SELECT count(*) FROM singer").fetchone() == (4,)


def test_all_fail_writes_the_greedy_candidate(db, executor):
    sql, rec = vote(cands(("SELECT x FROM nowhere", -9.0), ("SELECT y FROM nowhere", -1.0)), db, executor)
    assert sql == "SELECT x FROM nowhere" and rec["fallback"] == "greedy" and rec["winner"] is None
    sql, rec = vote(cands(("SELECT x FROM nowhere", -9.0), ("SELECT y FROM nowhere", -1.0), greedy_first=False),
                    db, executor)
    assert sql == "SELECT y FROM nowhere" and rec["fallback"] == "best_logprob"


def test_prefer_rows_puts_empty_results_last(db, executor):
    """Pins --prefer_rows: a group with rows beats a larger group whose result is empty (the default still counts
    heads); when every candidate that runs is empty, the largest empty group still wins over the failures."""
    many_empty = cands(("SELECT name FROM singer WHERE country = 'Chad'", -0.5),
                       ("SELECT name FROM singer WHERE age > 99", -0.7),
                       ("SELECT name FROM singer WHERE country = 'Peru'", -4.0))
    assert vote(many_empty, db, executor)[0] == "SELECT name FROM singer WHERE country = 'Chad'"
    sql, rec = vote(many_empty, db, executor, prefer_rows=True)
    assert sql == "SELECT name FROM singer WHERE country = 'Peru'" and rec["prefer_rows"] is True
    assert [(g["size"], g["rows"]) for g in rec["groups"]] == [(2, 0), (1, 1)]
    only_empty = cands(("SELECT nme FROM singer", -0.1), ("SELECT name FROM singer WHERE id = 9", -3.0),
                       ("SELECT name FROM singer WHERE id = 8", -2.0))
    sql, rec = vote(only_empty, db, executor, prefer_rows=True)
    assert sql == "SELECT name FROM singer WHERE id = 8" and rec["fallback"] is None


def test_record_is_json_and_complete(db, executor):
    _, rec = vote(cands(("SELECT name FROM singer", -1.0), ("SELECT nothing", -2.0)), db, executor)
    back = json.loads(json.dumps(rec))
    assert back["method"] == "execution" and len(back["candidates"]) == 2
    ok, bad = back["candidates"]
    assert ok["sql"] == "SELECT name FROM singer" and ok["logprob"] == -1.0 and ok["error"] is None
    assert len(ok["result"]["signature"]) == 12 and ok["result"]["rows"] == 4
    assert bad["result"] is None and bad["error"]


def test_missing_database_is_one_clear_error(tmp_path, executor):
    with pytest.raises(SqltuneError, match="missing"):
        vote(cands(("SELECT 1", -1.0)), tmp_path / "none" / "none.sqlite", executor)


def test_signature_ignores_column_and_row_order_unless_ordered():
    assert signature([(1, "a"), (2, "b")], False) == signature([("b", 2), ("a", 1)], False)
    assert signature([(1, "a"), (2, "b")], True) != signature([(2, "b"), (1, "a")], True)
    assert signature([(4,)], False) == signature([(4.0,)], False)


def test_retry_keeps_a_greedy_sql_that_runs(db, executor):
    sql, rec = choose_retry(cands(("SELECT name FROM singer", -3.0))[0], [], db, executor)
    assert sql == "SELECT name FROM singer" and rec["chosen"] == 0 and rec["fallback"] is None


def test_retry_takes_the_most_probable_sample_that_runs(db, executor):
    greedy, *samples = cands(("SELECT nme FROM singer", -0.1), ("SELECT age FROM singer", -4.0),
                             ("SELECT oops", -0.5), ("SELECT name FROM singer", -2.0))
    sql, rec = choose_retry(greedy, samples, db, executor)
    assert sql == "SELECT name FROM singer" and rec["chosen"] == 3 and rec["retried"] == 3
    sql, rec = choose_retry(greedy, samples[1:2], db, executor)
    assert sql == "SELECT nme FROM singer" and rec["fallback"] == "greedy"


# ------------------------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny(tiny_model):
    from sqltune.loading import load_model, load_tokenizer
    from sqltune.templates import get_template, stop_token_ids

    tok = load_tokenizer(tiny_model)
    template = get_template("chatml", tok)
    return load_model(tiny_model).eval(), tok, template, stop_token_ids(tok, template)


@pytest.fixture(scope="module")
def prompts(tiny, prepared_demo):
    from sqltune.templates import encode_prompt

    _, tok, template, _ = tiny
    records = list(read_jsonl(prepared_demo / "demo_dev.jsonl"))[:3]
    return [encode_prompt(tok, template, r, 256)[0] for r in records], records


def _greedy_reference(model, tok, prompt, stop, max_new_tokens):
    """Plain generate()'s greedy tokens for one prompt, cut at the first stop/pad token, and their summed
    log-probability by a teacher-forced forward pass (the stop token included)."""
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                         temperature=None, top_p=None, top_k=None)[0, len(prompt):].tolist()
    cut = next((j for j, t in enumerate(out) if t in stop or t == tok.pad_token_id), len(out))
    kept = out[:min(cut + 1, len(out))]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + kept])).logits[0, len(prompt) - 1:-1]
    logprob = logits.log_softmax(-1).gather(1, torch.tensor(kept)[:, None]).sum().item()
    return tok.decode(out[:cut], skip_special_tokens=True), logprob


def test_candidates_are_n_samples_plus_greedy(tiny, prompts):
    import torch

    from sqltune.infer.vote import generate_candidates

    model, tok, _, stop = tiny
    ids, _ = prompts
    torch.manual_seed(0)
    out = generate_candidates(model, tok, ids, stop, num_samples=4, temperature=0.9, top_p=0.95, include_greedy=True,
                              max_new_tokens=16)
    assert len(out) == len(ids)
    for prompt, row in zip(ids, out):
        assert [c["source"] for c in row] == ["greedy"] + ["sample"] * 4
        assert all(math.isfinite(c["logprob"]) and c["logprob"] <= 0 for c in row)
        text, logprob = _greedy_reference(model, tok, prompt, stop, 16)
        assert row[0]["text"] == text
        assert row[0]["logprob"] == pytest.approx(logprob, abs=1e-3)
        assert len({c["text"] for c in row[1:]}) > 1  # a random model at T=0.9 does not repeat itself


def test_sample_log_probabilities_are_the_models_not_the_tempered_ones(tiny, prompts):
    """At a near-zero temperature every sample is the greedy answer; its log-probability must be the greedy one's
    (the model's distribution), not ~0 as it would be after temperature scaling."""
    from sqltune.infer.vote import generate_candidates

    model, tok, _, stop = tiny
    ids, _ = prompts
    out = generate_candidates(model, tok, ids[:2], stop, num_samples=2, temperature=1e-4, top_p=1.0,
                              include_greedy=True, max_new_tokens=12)
    for row in out:
        assert row[0]["logprob"] < -1.0
        for sample in row[1:]:
            assert sample["text"] == row[0]["text"]
            assert sample["logprob"] == pytest.approx(row[0]["logprob"], abs=1e-3)


def test_samples_read_each_prompt_once_and_match_plain_sampling(tiny, prompts):
    """Pins the shared-prompt sampling: the prompts (of different lengths, so left-padded) are read once, not once
    per sample, and with the same seed the samples and their log-probabilities are those of plain
    generate(num_return_sequences=n)."""
    import torch

    from sqltune.infer.vote import _generate, _left_pad

    model, tok, _, stop = tiny
    ids = [p[:40 + 7 * i] for i, p in enumerate(prompts[0][:3])]
    assert len({len(p) for p in ids}) == 3
    rows_read = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: rows_read.append(tuple(out.shape[:2])))
    try:
        torch.manual_seed(7)
        shared = _generate(model, tok, ids, stop, 4, 0.9, 1.0, 10, "sample", None)
    finally:
        hook.remove()
    assert rows_read[0] == (3, max(len(p) for p in ids) - 1)  # one read of every prompt
    assert all(shape == (12, 1) for shape in rows_read[1:])  # then one token per sample and step
    pad_ids, mask = _left_pad(ids, tok.pad_token_id)
    torch.manual_seed(7)
    plain = model.generate(input_ids=pad_ids, attention_mask=mask, do_sample=True, num_return_sequences=4,
                           temperature=0.9, top_p=None, top_k=None, max_new_tokens=10, eos_token_id=stop,
                           pad_token_id=tok.pad_token_id)[:, pad_ids.shape[1]:].tolist()
    for k, row in enumerate(r for group in shared for r in group):
        tokens = plain[k]
        cut = next((j for j, t in enumerate(tokens) if t in stop or t == tok.pad_token_id), len(tokens))
        assert row["text"] == tok.decode(tokens[:cut], skip_special_tokens=True)


# ------------------------------------------------------------------ the vote groups exactly as EX scores (issue 26)
def test_the_value_placeholder_groups_as_ex_reads_it(db, executor):
    """Pins: EX runs a prediction with `value` read as 1 (the official rule), the vote ran it as written (a
    failing column), so two candidates EX scores alike were split."""
    _, rec = vote(cands(("SELECT name FROM singer WHERE age > value", -1.0),
                        ("SELECT name FROM singer WHERE age > 1", -2.0)), db, executor)
    assert [g["members"] for g in rec["groups"]] == [[0, 1]]


def test_every_file_of_a_test_suite_folder_must_agree(db, executor):
    """Pins: EX compares on every SQLite file of the database's folder (test-suite accuracy), the vote on the one
    file only, so candidates equal there but not on the other files were one answer."""
    other = db.parent / "concert_2.sqlite"
    import shutil

    shutil.copy(db, other)
    conn = sqlite3.connect(other)
    conn.execute("INSERT INTO singer VALUES (5, 'Ed', 20, 'Chad')")
    conn.commit()
    conn.close()
    pair = cands(("SELECT name FROM singer WHERE age > 30", -1.0), ("SELECT name FROM singer WHERE name != 'Bo'", -2.0))
    _, rec = vote(pair, db, executor)
    assert len(rec["groups"]) == 2


def test_bird_groups_sets_of_rows_in_column_order(db, executor):
    """Pins: a BIRD dataset is scored as sets of rows with columns in order, the vote grouped it with Spider's
    rules (any column order)."""
    pair = cands(("SELECT name, age FROM singer", -1.0), ("SELECT age, name FROM singer", -2.0))
    assert len(vote(pair, db, executor)[1]["groups"]) == 1
    assert len(vote(pair, db, executor, bird=True)[1]["groups"]) == 2
    dup = cands(("SELECT country FROM singer", -1.0), ("SELECT DISTINCT country FROM singer", -2.0))
    assert len(vote(dup, db, executor, bird=True, keep_distinct=True)[1]["groups"]) == 1


def test_the_record_keeps_the_timeout_it_ran_with(db, executor):
    """Pins: the vote ran with its own 10 s timeout, kept nowhere; each record now says the timeout (the
    evaluator's by default, also written in predict's meta)."""
    _, rec = vote(cands(("SELECT name FROM singer", -1.0)), db, executor)
    assert rec["timeout"] == 5.0
    from sqltune.infer.vote import EXEC_TIMEOUT

    assert EXEC_TIMEOUT == EvalConfig().timeout


def test_a_candidate_that_hangs_is_killed_and_the_vote_goes_on(db):
    """Pins: the vote's 10 s limit held for 128 s on a LIKE over a long string. The worker running it is killed
    after the timeout; that candidate fails with the reason and the others are grouped."""
    from sqltune.sandbox import Limits, Sandbox

    hang = ("SELECT name FROM singer WHERE replace(hex(zeroblob(300000)), '00', 'aa') LIKE "
            "'%' || replace(hex(zeroblob(20000)), '00', 'aa') || 'b%'")
    with Sandbox(1, Limits(timeout=1)) as sandbox:
        sql, rec = vote(cands((hang, -0.1), ("SELECT name FROM singer", -1.0), ("SELECT name FROM singer", -2.0)),
                        db, sandbox)
    assert sql == "SELECT name FROM singer" and "timed out after 1 s" in rec["candidates"][0]["error"]


def test_the_results_a_vote_keeps_are_bounded_in_total(db):
    """Pins: the vote kept every candidate's result at once (6 wide candidates: 1.99 GB). One result per group is
    kept, at most twice the per-result bound in all; past it a candidate fails with that reason."""
    from sqltune.sandbox import Limits, Sandbox

    wide = [(f"SELECT hex(zeroblob(20000)) || '{k}' FROM singer", -float(k)) for k in range(6)]  # ~160 kB each
    with Sandbox(1, Limits(timeout=10, max_bytes=200_000)) as sandbox:
        _, rec = vote(cands(*wide), db, sandbox)
    errors = [c["error"] for c in rec["candidates"]]
    assert errors[0] is None and errors[1] is None
    assert all(e and "in total" in e for e in errors[2:])


def test_an_unusable_database_stops_a_vote_before_it_starts(tmp_path):
    """Pins (issue 26): predict checked only that each database file existed, so with a broken one every candidate
    failed and every answer fell back to greedy, silently. Now it is one line naming the file, before any model
    is loaded."""
    from sqltune.config import PredictConfig
    from sqltune.infer.predict import vote_databases

    broken = tmp_path / "db" / "shop" / "shop.sqlite"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"")
    cfg = PredictConfig(dataset="x", vote="execution", num_samples=2)
    with pytest.raises(SqltuneError, match=r"shop.sqlite is empty file \(0 bytes\)"):
        vote_databases(cfg, [{"db_id": "shop"}], {"db_dir": str(tmp_path / "db")})
