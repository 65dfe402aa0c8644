"""`sqltune ask` on the tiny random model: its SQL is garbage, so the plumbing is tested with canned generations
where the answer matters (JSON shape, the table, --max_rows, errors of failing and hostile SQL, the stdin loop with
the model loaded once, the vote) and with the real model where only the shape does."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3

import pytest

from sqltune.cli import main
from sqltune.config import AskConfig
from sqltune.errors import SqltuneError
from sqltune.infer.hf_backend import HFGenerator
from sqltune.infer.prompt_format import trained_schema_style
from sqltune.infer.vote import make_candidate

KEYS = {"sql", "columns", "rows", "error"}


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "concert.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, country TEXT);
        CREATE TABLE concert (id INTEGER PRIMARY KEY, singer_id INTEGER REFERENCES singer(id), year INTEGER);
        INSERT INTO singer VALUES (1, 'Ann', 52, 'France'), (2, 'Bo', 29, 'France'), (3, 'Cy', 41, 'Spain'),
                                  (4, 'Di', 35, 'Peru'), (5, 'Ed', 60, 'Chile');
        INSERT INTO concert VALUES (1, 1, 2014), (2, 3, 2015);
    """)
    conn.commit()
    conn.close()
    return path


def canned(monkeypatch, *texts):
    """HFGenerator.generate answers with `texts` in turn; the prompts it was given are recorded."""
    prompts = []
    answers = iter(texts)

    def generate(self, batch):
        prompts.extend(self.tokenizer.decode(p) for p in batch)
        return [(next(answers), 3) for _ in batch]

    monkeypatch.setattr(HFGenerator, "generate", generate)
    return prompts


def ask(tiny_model, db, *args, stdin=None, monkeypatch=None):
    argv = ["ask", "--model_name_or_path", str(tiny_model), "--db", str(db), "--max_new_tokens", "8",
            "--template", "chatml", *args]
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(argv)


def test_json_is_one_object_of_the_four_fields(tiny_model, db, capsys):
    """The real (random) model end to end: one JSON object with sql, columns, rows, error, whatever it wrote."""
    assert ask(tiny_model, db, "--format", "json", "how many singers are there?") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    answer = json.loads(lines[0])
    assert set(answer) == KEYS
    assert isinstance(answer["sql"], str) and isinstance(answer["rows"], list)
    assert answer["error"] is None or isinstance(answer["error"], str)


def test_the_result_is_printed_as_a_table(tiny_model, db, capsys, monkeypatch):
    canned(monkeypatch, "SELECT name, age FROM singer WHERE country = 'France' ORDER BY id")
    assert ask(tiny_model, db, "who sings in France?") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:6] == ["SQL: SELECT name, age FROM singer WHERE country = 'France' ORDER BY id",
                                    "name | age", "-----+----", "Ann  | 52", "Bo   | 29", "(2 rows)"]


def test_max_rows_cuts_the_result_and_says_so(tiny_model, db, capsys, monkeypatch):
    canned(monkeypatch, "SELECT name FROM singer ORDER BY id", "SELECT name FROM singer ORDER BY id")
    assert ask(tiny_model, db, "--max_rows", "2", "all singers") == 0
    out = capsys.readouterr().out
    assert "Ann" in out and "Bo" in out and "Cy" not in out
    assert "(the first 2 rows; more follow)" in out
    assert ask(tiny_model, db, "--max_rows", "2", "--format", "json", "all singers") == 0
    assert json.loads(capsys.readouterr().out) == {"sql": "SELECT name FROM singer ORDER BY id", "columns": ["name"],
                                                  "rows": [["Ann"], ["Bo"]], "error": None}


def test_failing_sql_fills_the_error_field(tiny_model, db, capsys, monkeypatch):
    canned(monkeypatch, "SELECT nope FROM nowhere", "SELECT nope FROM nowhere", "I cannot answer that.")
    assert ask(tiny_model, db, "--format", "json", "q") == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["sql"] == "SELECT nope FROM nowhere" and "no such table" in answer["error"]
    assert answer["columns"] == [] and answer["rows"] == []
    assert ask(tiny_model, db, "q") == 0
    assert "error: " in capsys.readouterr().out
    assert ask(tiny_model, db, "--format", "json", "q") == 0  # prose, no query: nothing is run
    assert json.loads(capsys.readouterr().out)["error"] == "the model wrote no SQL"


@pytest.mark.parametrize("text, says", [
    ("WITH x AS (SELECT 1) DELETE FROM singer", "write refused"),
    ("SELECT load_extension('/tmp/evil')", "refused: a function that is not allowed"),
    ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c", "timed out"),
    ("DROP TABLE singer", "the model wrote no SQL"),  # not even a query: extraction keeps nothing, nothing runs
])
def test_a_hostile_query_is_refused_and_changes_nothing(tiny_model, db, capsys, monkeypatch, text, says):
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    canned(monkeypatch, text)
    assert ask(tiny_model, db, "--format", "json", "--timeout", "1", "drop everything") == 0
    answer = json.loads(capsys.readouterr().out)
    assert says in answer["error"] and answer["rows"] == []
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith("concert")) == ["concert.sqlite"]


def test_without_a_question_it_reads_stdin_until_eof_with_the_model_loaded_once(tiny_model, db, capsys,
                                                                                 monkeypatch):
    import sqltune.loading

    loads = []
    original = sqltune.loading.load_model
    monkeypatch.setattr(sqltune.loading, "load_model", lambda *a, **k: loads.append(1) or original(*a, **k))
    prompts = canned(monkeypatch, "SELECT count(*) FROM singer", "SELECT max(age) FROM singer",
                     "SELECT year FROM concert ORDER BY year")
    assert ask(tiny_model, db, "--format", "json", stdin="how many singers?\n\n  oldest age? \nyears\n",
               monkeypatch=monkeypatch) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["rows"] for a in answers] == [[[5]], [[60]], [[2014], [2015]]]
    assert len(loads) == 1
    assert len(prompts) == 3 and "oldest age?\n" in prompts[1]  # blank lines skipped, questions stripped


def test_the_prompt_states_the_files_schema_in_the_style_asked(tiny_model, db, capsys, monkeypatch):
    prompts = canned(monkeypatch, "SELECT 1", "SELECT 1")
    assert ask(tiny_model, db, "how many singers?") == 0
    assert "concert contains tables such as singer, concert." in prompts[0]  # words: prepare's default
    assert "###Input:\nhow many singers?\n\n###Response:" in prompts[0]
    assert ask(tiny_model, db, "--schema_style", "ddl+rows", "--sample_rows", "1", "how many singers?") == 0
    assert "CREATE TABLE singer" in prompts[1] and "FOREIGN KEY (singer_id) REFERENCES singer(id)" in prompts[1]
    assert "1 | Ann | 52 | France" in prompts[1]


def test_an_adapter_is_asked_in_its_trained_template_length_and_schema_style(tiny_model, demo_dir, db, tmp_path,
                                                                            capsys, monkeypatch):
    """No --template, --max_source_length or --schema_style: the adapter's training record gives all three (the
    style through the registry of the data it names)."""
    from sqltune.config import PrepareConfig, TrainConfig
    from sqltune.data.prepare import prepare
    from sqltune.train.sft import train

    prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path / "data"), name="demo", schema_style="ddl"))
    train(TrainConfig(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(tmp_path / "data"),
                      template="chatml", output_dir=str(tmp_path / "adapter"), max_steps=1, max_source_length=300,
                      per_device_train_batch_size=2, save_steps=100))
    prompts = []

    def generate(self, batch):
        prompts.extend(batch)
        return [("SELECT count(*) FROM singer", 3) for _ in batch]

    monkeypatch.setattr(HFGenerator, "generate", generate)
    assert main(["ask", "--model_name_or_path", str(tiny_model), "--adapter", str(tmp_path / "adapter"), "--db",
                 str(db), "--format", "json", "how many singers? " * 80]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[5]]
    (ids,) = prompts
    from sqltune.loading import load_tokenizer

    text = load_tokenizer(tiny_model).decode(ids)
    assert len(ids) <= 300 and "<|im_start|>" in text  # cut to the trained length, in the trained template
    prompts.clear()
    assert main(["ask", "--model_name_or_path", str(tiny_model), "--adapter", str(tmp_path / "adapter"), "--db",
                 str(db), "how many singers?"]) == 0
    assert "CREATE TABLE singer" in load_tokenizer(tiny_model).decode(prompts[0])


def test_the_schema_style_comes_from_the_training_data(prepared_demo, tmp_path):
    assert trained_schema_style({"dataset": "demo_train", "dataset_path": str(prepared_demo)}) == "words"
    assert trained_schema_style({"dataset": "demo_train", "dataset_path": str(tmp_path / "gone")}) is None
    assert trained_schema_style({}) is None


def test_a_vote_answers_with_the_largest_group(tiny_model, db, capsys, monkeypatch):
    def candidates(self, prompts, n, include_greedy, end):
        assert n == 3 and include_greedy
        return [[make_candidate("SELECT name FROM singer WHERE id = 1", -1.0, "greedy", 3),
                 make_candidate("SELECT count(*) FROM singer", -2.0, "sample", 3),
                 make_candidate("SELECT count(id) FROM singer", -3.0, "sample", 3),
                 make_candidate("SELECT nope", -0.5, "sample", 3)] for _ in prompts]

    monkeypatch.setattr(HFGenerator, "candidates", candidates)
    assert ask(tiny_model, db, "--format", "json", "--num_samples", "3", "--vote", "execution", "how many?") == 0
    assert json.loads(capsys.readouterr().out) == {"sql": "SELECT count(*) FROM singer", "columns": ["count(*)"],
                                                  "rows": [[5]], "error": None}


def test_blobs_and_odd_floats_still_make_json_and_a_table(tiny_model, tmp_path, capsys, monkeypatch):
    path = tmp_path / "odd.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (b BLOB, f REAL, s TEXT)")
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", (b"\x00\x01\x02", 1e999, "two\nlines"))
    conn.commit()
    conn.close()
    canned(monkeypatch, "SELECT b, f, s FROM t", "SELECT b, f, s FROM t")
    assert ask(tiny_model, path, "--format", "json", "q") == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [["<3 bytes>", "inf", "two\nlines"]]
    assert ask(tiny_model, path, "q") == 0
    assert "<3 bytes> | inf | two lines" in capsys.readouterr().out


@pytest.mark.parametrize("case, says", [
    ("missing", "file not found"),
    ("text", "not a SQLite database"),
    ("empty", "empty file"),
    ("folder", "is a folder"),
    ("no_tables", "has no tables"),
    ("no_model", "--model_name_or_path is required"),
    ("bad_model", "model folder not found"),
    ("no_db", "--db is required"),
    ("bad_format", "--format must be table or json"),
    ("vote_alone", "--vote execution needs --num_samples 2 or more"),
])
def test_bad_input_is_one_line(tiny_model, db, tmp_path, capsys, case, says):
    target, model = db, str(tiny_model)
    extra: list[str] = []
    if case == "missing":
        target = tmp_path / "nowhere.sqlite"
    elif case == "text":
        target = tmp_path / "notes.sqlite"
        target.write_text("not a database at all, but long enough to have a header of a hundred bytes " * 3)
    elif case == "empty":
        target = tmp_path / "empty.sqlite"
        target.write_bytes(b"")
    elif case == "folder":
        target = tmp_path
    elif case == "no_tables":
        target = tmp_path / "bare.sqlite"
        sqlite3.connect(target).execute("PRAGMA user_version = 1").connection.close()
    elif case == "bad_format":
        extra = ["--format", "yaml"]
    elif case == "vote_alone":
        extra = ["--vote", "execution"]
    argv = ["ask", "--model_name_or_path", model, "--db", str(target), *extra, "a question"]
    if case == "no_model":
        argv = ["ask", "--db", str(db), "q"]
    elif case == "bad_model":
        argv = ["ask", "--model_name_or_path", str(tmp_path / "no_model"), "--db", str(db), "q"]
    elif case == "no_db":
        argv = ["ask", "--model_name_or_path", model, "q"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err


def test_ask_config_and_help(capsys):
    assert AskConfig().format == "table" and AskConfig().max_rows == 20
    with pytest.raises(SqltuneError, match="--max_rows"):
        AskConfig(max_rows=0)
    assert main(["ask", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max_rows" in out and "--schema_style" in out and "stdin" in out
    assert main(["--help"]) == 0
    assert "ask " in capsys.readouterr().out


def test_shown_rows_cuts_a_long_result_instead_of_failing(db):
    """The sandbox task behind ask: columns, the first n rows and whether more followed, while the same result
    over a query's row bound is an error for `query` (EX and the vote compare whole results)."""
    from sqltune.sandbox import Limits, QueryError, Sandbox, query, shown_rows

    with Sandbox(1, Limits(timeout=5, max_rows=3)) as box:
        assert box.call(shown_rows, db, "SELECT id, name FROM singer ORDER BY id", 2) == (
            ["id", "name"], [(1, "Ann"), (2, "Bo")], True)
        assert box.call(shown_rows, db, "SELECT id FROM singer ORDER BY id", 10) == (
            ["id"], [(1,), (2,), (3,)], True)  # never more than the sandbox's bound
        assert box.call(shown_rows, db, "SELECT id FROM concert", 10) == (["id"], [(1,), (2,)], False)
        with pytest.raises(QueryError, match="more than 3 rows"):
            box.call(query, db, "SELECT id FROM singer")
