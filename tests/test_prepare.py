"""prepare: Spider-layout folders -> supervised records, gold files and the registry; clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from conftest import SHARED, SPIDER, needs_spider

from sqltune.cli import main
from sqltune.config import PrepareConfig
from sqltune.data.prepare import prepare
from sqltune.data.prompts import INSTRUCTION, make_instruction, question_of
from sqltune.data.registry import lookup
from sqltune.errors import SqltuneError


def records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_spider_layout_records_gold_and_registry(demo_dir, tmp_path):
    figures = prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path)))
    assert figures["train_records"] == 80 and figures["dev_records"] == 30
    train = records(tmp_path / "spider_train.jsonl")
    dev = records(tmp_path / "spider_dev.jsonl")
    source_dev = json.loads((demo_dir / "dev.json").read_text())
    assert set(train[0]) == {"db_id", "instruction", "input", "output", "history"}
    assert [r["output"] for r in dev] == [q["query"] for q in source_dev]  # source order kept
    assert dev[0]["input"] == f"###Input:\n{source_dev[0]['question']}\n\n###Response:"
    assert question_of(dev[0]) == source_dev[0]["question"]
    assert dev[0]["instruction"].startswith(INSTRUCTION)
    gold = (tmp_path / "spider_dev_gold.sql").read_text().splitlines()
    assert gold == [f"{q['query']}\t{q['db_id']}" for q in source_dev]
    entry = lookup(tmp_path, "spider_dev")
    assert entry["gold"].endswith("spider_dev_gold.sql") and entry["records"] == 30


def test_schema_in_words_names_tables_keys_and_foreign_keys(demo_dir, tmp_path):
    prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path), splits="dev"))
    school = next(r for r in records(tmp_path / "spider_dev.jsonl") if r["db_id"] == "school")
    text = school["instruction"]
    assert "school contains tables such as teacher, student, course." in text
    assert "Table teacher has columns such as teacher_id, name, department, salary. teacher_id is the primary key." in text
    assert "The advisor_id of student is the foreign key of teacher_id of teacher." in text


@pytest.mark.parametrize("style", ["ddl", "ddl+rows"])
def test_ddl_styles(demo_dir, tmp_path, style):
    prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path), splits="dev", schema_style=style, sample_rows=2))
    shop = next(r for r in records(tmp_path / "spider_dev.jsonl") if r["db_id"] == "shop")
    text = shop["instruction"]
    assert "CREATE TABLE orders (" in text and "PRIMARY KEY (order_id)" in text
    assert "FOREIGN KEY (customer_id) REFERENCES customer(customer_id)" in text
    assert ("2 example rows from customer" in text) == (style == "ddl+rows")


def test_token_budget_cuts_schema_and_counts(demo_dir, tmp_path):
    figures = prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path), splits="dev", max_prompt_tokens=60))
    assert figures["dev_prompts_cut"] == 30
    for r in records(tmp_path / "spider_dev.jsonl"):
        assert len(r["instruction"].split()) <= 60
        assert r["input"].startswith("###Input:")  # the question is never cut


def test_rows_yield_before_tables_under_a_token_budget(demo_dir, tmp_path):
    """Pins: with ddl+rows and --max_prompt_tokens, a schema over the budget used to lose whole tables from its end
    (which the model then invents) while keeping every example row; now rows yield first (fewer per table, down to
    none) and tables are cut only when the plain DDL does not fit either."""
    full = prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path / "full"), splits="dev",
                                 schema_style="ddl+rows", sample_rows=3))
    assert "dev_prompts_with_fewer_rows" not in full
    plain = records(tmp_path / "full" / "spider_dev.jsonl")[0]["instruction"]
    ddl = prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path / "ddl"), splits="dev", schema_style="ddl"))
    assert ddl["dev_records"] == full["dev_records"]
    no_rows = records(tmp_path / "ddl" / "spider_dev.jsonl")[0]["instruction"]
    budget = len(no_rows.split()) + 2  # the plain DDL fits, the DDL with rows does not
    assert len(plain.split()) > budget
    figures = prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path / "fit"), splits="dev",
                                    schema_style="ddl+rows", sample_rows=3, max_prompt_tokens=budget))
    fitted = records(tmp_path / "fit" / "spider_dev.jsonl")[0]["instruction"]
    assert len(fitted.split()) <= budget and fitted.count("CREATE TABLE") == no_rows.count("CREATE TABLE")
    assert figures["dev_prompts_with_fewer_rows"] >= 1
    tight_budget = len(make_instruction([]).split()) + 3
    tight = prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path / "tight"), splits="dev",
                                  schema_style="ddl+rows", sample_rows=3, max_prompt_tokens=tight_budget))
    assert tight["dev_prompts_cut"] == tight["dev_records"]  # too tight for the plain DDL: tables go too
    assert "example rows" not in (tmp_path / "tight" / "spider_dev.jsonl").read_text()
    assert all(len(r["instruction"].split()) <= tight_budget for r in records(tmp_path / "tight" / "spider_dev.jsonl"))


def test_a_budget_below_the_fixed_instruction_is_one_error(demo_dir, tmp_path, capsys):
    """Pins: a --max_prompt_tokens smaller than the instruction's own fixed text used to be accepted, and every
    prompt came out longer than the cap while prepare said it had cut them to fit; now it stops with one line."""
    with pytest.raises(SqltuneError, match="leaves no room for the schema"):
        prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path / "o"), splits="dev", max_prompt_tokens=20))
    code, _, err = run_cli(["prepare", "--data_dir", str(demo_dir), "--out", str(tmp_path / "o"), "--splits", "dev",
                            "--max_prompt_tokens", "20"], capsys)
    assert code == 2 and err.count("\n") == 1 and "fixed text alone is 42 tokens" in err
    assert not (tmp_path / "o" / "spider_dev.jsonl").exists()


def test_fewer_rows_counts_only_schemas_that_lost_rows(demo_dir, tmp_path):
    """Pins: with no database file there are no rows to show, yet a ddl+rows schema over the budget used to be
    counted in dev_prompts_with_fewer_rows (the row level was lowered although the text did not change)."""
    data = tmp_path / "no_databases"
    data.mkdir()
    for name in ("tables.json", "dev.json"):
        shutil.copy(demo_dir / name, data / name)
    budget = len(make_instruction([]).split()) + 3
    figures = prepare(PrepareConfig(data_dir=str(data), out=str(tmp_path / "o"), splits="dev",
                                    schema_style="ddl+rows", sample_rows=3, max_prompt_tokens=budget))
    assert figures["dev_records_without_database"] == figures["dev_records"] == figures["dev_prompts_cut"]
    assert figures["dev_prompts_with_fewer_rows"] == 0


def test_bird_evidence_in_prompt(tmp_path, demo_dir):
    data = tmp_path / "bird"
    (data / "dev_databases").mkdir(parents=True)
    shutil.copy(demo_dir / "tables.json", data / "dev_tables.json")
    shutil.copytree(demo_dir / "database" / "shop", data / "dev_databases" / "shop")
    (data / "dev.json").write_text(json.dumps([{"question_id": 0, "db_id": "shop", "question": "Expensive products?",
                                                "evidence": "expensive means price > 400",
                                                "SQL": "SELECT name FROM product WHERE price > 400",
                                                "difficulty": "simple"}]))
    prepare(PrepareConfig(source="bird", data_dir=str(data), out=str(tmp_path / "out"), splits="dev"))
    row = records(tmp_path / "out" / "bird_dev.jsonl")[0]
    assert "expensive means price > 400" in row["instruction"]
    assert (tmp_path / "out" / "bird_dev_difficulty.txt").read_text() == "simple\n"


def test_the_token_budget_counts_the_evidence(tmp_path, demo_dir):
    """Pins: --max_prompt_tokens used to fit the schema to the instruction without BIRD's evidence, so an instruction
    with evidence came out over the cap and was not counted as cut; now the evidence counts, and the schema is fitted
    per database and evidence, and an evidence too long for any schema is counted as over the budget."""
    data = tmp_path / "bird"
    (data / "dev_databases").mkdir(parents=True)
    shutil.copy(demo_dir / "tables.json", data / "dev_tables.json")
    shutil.copytree(demo_dir / "database" / "shop", data / "dev_databases" / "shop")
    question = {"db_id": "shop", "question": "Expensive products?", "SQL": "SELECT name FROM product WHERE price > 400",
                "difficulty": "simple"}
    (data / "dev.json").write_text(json.dumps([
        {**question, "question_id": 0, "evidence": "expensive means price > 400"},
        {**question, "question_id": 1, "evidence": ""},
        {**question, "question_id": 2, "evidence": "long " * 200}]))
    prepare(PrepareConfig(source="bird", data_dir=str(data), out=str(tmp_path / "full"), splits="dev"))
    plain = records(tmp_path / "full" / "bird_dev.jsonl")[1]["instruction"]
    budget = len(plain.split())  # fits without the evidence, not with it
    figures = prepare(PrepareConfig(source="bird", data_dir=str(data), out=str(tmp_path / "out"), splits="dev",
                                    max_prompt_tokens=budget))
    rows = records(tmp_path / "out" / "bird_dev.jsonl")
    assert all(len(r["instruction"].split()) <= budget for r in rows[:2])
    assert "expensive means price > 400" in rows[0]["instruction"] and rows[1]["instruction"] == plain
    assert figures["dev_prompts_cut"] == 2 and figures["dev_prompts_over_budget"] == 1  # its evidence cannot fit


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_inputs_are_one_line_errors(tmp_path, demo_dir, capsys):
    code, _, err = run_cli(["prepare", "--data_dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and "data folder not found" in err

    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    (broken / "dev.json").write_text('[{"db_id": "shop",\n "question": oops}]')
    code, _, err = run_cli(["prepare", "--data_dir", str(broken), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "dev.json at line 2" in err and "Traceback" not in err

    (broken / "dev.json").write_text(json.dumps([{"db_id": "nowhere", "question": "q", "query": "SELECT 1"}]))
    code, _, err = run_cli(["prepare", "--data_dir", str(broken), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "'nowhere'" in err and "no schema" in err

    tables = json.loads((demo_dir / "tables.json").read_text())
    tables[0]["foreign_keys"].append([999, 1])
    (broken / "tables.json").write_text(json.dumps(tables))
    code, _, err = run_cli(["prepare", "--data_dir", str(broken), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "out of range" in err

    code, _, err = run_cli(["prepare", "--data_dir", str(demo_dir), "--schema_style", "xml"], capsys)
    assert code == 2 and "--schema_style" in err
    code, _, err = run_cli(["prepare", "--data_dir", str(demo_dir), "--scheme_style", "ddl"], capsys)
    assert code == 2 and "did you mean --schema_style" in err
    assert not (tmp_path / "o" / "spider_dev.jsonl").exists()  # nothing half-written


def test_missing_tables_file(tmp_path):
    (tmp_path / "dev.json").write_text("[]")
    with pytest.raises(SqltuneError, match="tables file not found"):
        prepare(PrepareConfig(data_dir=str(tmp_path), out=str(tmp_path / "o")))


def test_help_lists_stages(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for stage in ("prepare", "train", "merge", "predict", "evaluate", "run", "trace"):
        assert f"  {stage} " in out
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0 and "--lora_rank" in out and "--model_name_or_path" in out


def test_yaml_config_with_override(tmp_path, demo_dir, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"prepare:\n  data_dir: {demo_dir}\n  out: {tmp_path / 'o'}\n  schema_style: ddl\n")
    code, _, err = run_cli(["prepare", str(cfg), "--splits", "dev"], capsys)
    assert code == 0, err
    assert not (tmp_path / "o" / "spider_train.jsonl").exists()
    assert "CREATE TABLE" in records(tmp_path / "o" / "spider_dev.jsonl")[0]["instruction"]


@needs_spider
def test_real_spider_counts_and_first_record(tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (SPIDER / "database").glob("*/*.sqlite")}
    figures = prepare(PrepareConfig(data_dir=str(SPIDER), out=str(tmp_path)))
    assert figures["train_records"] == 8659 and figures["dev_records"] == 1034
    first = records(tmp_path / "spider_dev.jsonl")[0]
    assert first["db_id"] == "concert_singer" and first["output"] == "SELECT count(*) FROM singer"
    assert "How many singers do we have?" in first["input"]
    assert "concert_singer contains tables such as stadium, singer, concert, singer_in_concert." in first["instruction"]
    assert "Table singer has columns such as Singer_ID, Name, Country, Song_Name, Song_release_year, Age, Is_male." \
        in first["instruction"]
    assert "The Stadium_ID of concert is the foreign key of Stadium_ID of stadium." in first["instruction"]
    gold = (tmp_path / "spider_dev_gold.sql").read_text().splitlines()
    assert gold == (SPIDER / "dev_gold.sql").read_text().splitlines()
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert SHARED.is_dir()


def test_databases_are_opened_read_only(demo_db, tmp_path):
    from sqltune.io import connect_read_only

    conn = connect_read_only(demo_db / "shop" / "shop.sqlite")
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("DELETE FROM customer")
    conn.close()


def test_bad_values_in_input_are_one_line(tmp_path, demo_dir, capsys):
    """Pins: non-UTF-8 bytes, `question: 123`, `query: null` in prepare's input and a tables.json entry without
    `db_id` ended in an internal error (a traceback); each is now one line naming the file (and the record)."""
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    out = ["--out", str(tmp_path / "o")]
    good = json.loads((demo_dir / "dev.json").read_text())
    (broken / "dev.json").write_bytes(json.dumps(good[:2]).encode()[:-2] + b', "caf\xe9"]')
    code, _, err = run_cli(["prepare", "--data_dir", str(broken), *out], capsys)
    assert code == 2 and err.count("\n") == 1 and "dev.json is not UTF-8 text: byte 0xe9 at line 1" in err
    for field, value, shown in (("question", 123, "123"), ("query", None, "None")):
        rows = json.loads(json.dumps(good))
        rows[1][field] = value
        (broken / "dev.json").write_text(json.dumps(rows))
        code, _, err = run_cli(["prepare", "--data_dir", str(broken), *out], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"dev.json: example 1 field {field!r} must be text, not {shown}" in err
    (broken / "dev.json").write_text(json.dumps(good))
    tables = json.loads((demo_dir / "tables.json").read_text())
    del tables[1]["db_id"]
    (broken / "tables.json").write_text(json.dumps(tables))
    code, _, err = run_cli(["prepare", "--data_dir", str(broken), *out], capsys)
    assert code == 2 and err.count("\n") == 1 and "tables.json: entry 1 has no 'db_id'" in err
    assert not (tmp_path / "o" / "dataset_info.json").exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "x\\y", "名前", "a b"])
def test_names_with_path_parts_are_refused(tmp_path, demo_dir, capsys, name):
    """Pins: `prepare --name ../../x` wrote `../../x_train.jsonl` outside the output folder."""
    code, _, err = run_cli(["prepare", "--data_dir", str(demo_dir), "--out", str(tmp_path / "o" / "p"),
                            "--name", name], capsys)
    assert code == 2 and err.count("\n") == 1 and "--name must be a plain name" in err
    assert not any(tmp_path.rglob("*.jsonl"))


def test_plain_names_are_kept(tmp_path, demo_dir):
    prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path), name="spider-v1.0_x", splits="dev"))
    assert lookup(tmp_path, "spider-v1.0_x_dev")["records"] == 30


def test_failed_prepare_leaves_the_registry_as_it_was(tmp_path, demo_dir):
    """Pins: a prepare that failed on dev had already rewritten train (in ddl) and its registry entry, leaving a
    registry that mixed a ddl train with a words dev."""
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    out = tmp_path / "out"
    prepare(PrepareConfig(data_dir=str(data), out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    dev = json.loads((data / "dev.json").read_text())
    (data / "dev.json").write_text(json.dumps(dev + [{"db_id": "nowhere", "question": "q", "query": "SELECT 1"}]))
    with pytest.raises(SqltuneError, match="'nowhere'"):
        prepare(PrepareConfig(data_dir=str(data), out=str(out), schema_style="ddl"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing rewritten, no staging left over
    assert lookup(out, "spider_train")["schema_style"] == "words"


def test_progress_in_a_log_is_one_line_per_split(tmp_path, demo_dir, capsys):
    """Pins: in a log (stderr not a terminal) prepare's progress bars showed only `0%`; now each split is one line."""
    code, out, err = run_cli(["prepare", "--data_dir", str(demo_dir), "--out", str(tmp_path / "o")], capsys)
    assert code == 0
    assert err.splitlines() == ["prepare: spider_train: 80 records (words)", "prepare: spider_dev: 30 records (words)"]
    assert "train_records=80" in out


def test_mschema_on_a_small_database(tmp_path):
    """The mschema style: column types from the database, primary key, a few short distinct example values per
    column (NULLs, long texts and blobs left out), then the foreign keys."""
    from sqltune.data.schema import render_schema

    db = tmp_path / "zoo.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE keeper (keeper_id INTEGER PRIMARY KEY, name VARCHAR(20), photo BLOB)")
    conn.execute("CREATE TABLE animal (animal_id INTEGER, kind TEXT, keeper_id INTEGER, notes TEXT, "
                 "FOREIGN KEY (keeper_id) REFERENCES keeper(keeper_id))")
    conn.executemany("INSERT INTO keeper VALUES (?, ?, ?)", [(1, "Ada", b"\x00"), (2, "Bo", None), (3, "Cy", None)])
    conn.executemany("INSERT INTO animal VALUES (?, ?, ?, ?)",
                     [(7, "lion", 1, "x" * 80), (8, "lion", 2, None), (9, None, 2, None), (10, "yak\nmoo", 3, "ok")])
    conn.commit()
    conn.close()
    entry = {"db_id": "zoo", "table_names_original": ["keeper", "animal"],
             "column_names_original": [[-1, "*"], [0, "keeper_id"], [0, "name"], [0, "photo"], [1, "animal_id"],
                                       [1, "kind"], [1, "keeper_id"], [1, "notes"]],
             "column_types": ["text", "number", "text", "others", "number", "text", "number", "text"],
             "primary_keys": [1], "foreign_keys": [[6, 1]]}
    text = "".join(render_schema(entry, "mschema", db, sample_rows=2))
    assert text == (
        "【DB_ID】 zoo\n【Schema】\n"
        "# Table: keeper\n[\n(keeper_id:INTEGER, Primary Key, Examples: [1, 2]),\n(name:VARCHAR(20), Examples: [Ada, "
        "Bo]),\n(photo:BLOB)\n]\n"
        "# Table: animal\n[\n(animal_id:INTEGER, Examples: [7, 8]),\n(kind:TEXT, Examples: [lion, yak moo]),\n"
        "(keeper_id:INTEGER, Examples: [1, 2]),\n(notes:TEXT, Examples: [ok])\n]\n"
        "【Foreign keys】\nanimal.keeper_id=keeper.keeper_id\n")
    # without the database: types from tables.json, no examples
    assert "(keeper_id:NUMBER, Primary Key),\n(name:TEXT)," in "".join(render_schema(entry, "mschema", None, 2))


def test_mschema_prepare_end_to_end(tmp_path, demo_dir):
    prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path), splits="dev", schema_style="mschema"))
    shop = next(r for r in records(tmp_path / "spider_dev.jsonl") if r["db_id"] == "shop")
    assert "# Table: customer\n[\n(customer_id:INTEGER, Primary Key, Examples: [" in shop["instruction"]
    assert "【Foreign keys】\norders.customer_id=customer.customer_id\n" in shop["instruction"]
    assert lookup(tmp_path, "spider_dev")["schema_style"] == "mschema"


def test_out_inside_the_source_folder_is_refused(tmp_path, demo_dir):
    """Pins: `--out` equal to (or inside) the dataset folder wrote prepared files among the inputs."""
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data, data / "prepared"):
        with pytest.raises(SqltuneError, match="inside the source folder"):
            prepare(PrepareConfig(data_dir=str(data), out=str(out)))
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_the_token_budget_counts_in_the_given_tokenizer(demo_dir, tiny_model, tmp_path, capsys):
    """Pins --tokenizer: the budget is counted in the model's tokens, not words; a folder with no tokenizer in it
    used to end in `internal error: OSError ...`, now one line that says what is wrong."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    budget = 120
    figures = prepare(PrepareConfig(data_dir=str(demo_dir), out=str(tmp_path / "o"), splits="dev",
                                    max_prompt_tokens=budget, tokenizer=str(tiny_model)))
    lengths = [len(tok(r["instruction"], add_special_tokens=False)["input_ids"])
               for r in records(tmp_path / "o" / "spider_dev.jsonl")]
    assert max(lengths) <= budget and figures["dev_prompts_cut"] >= 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["prepare", "--data_dir", str(demo_dir), "--out", str(tmp_path / "e"), "--splits", "dev",
                            "--max_prompt_tokens", "100", "--tokenizer", str(tmp_path / "empty")], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "cannot load a tokenizer from" in last and "internal error" not in err


def _break(path, how):
    """Damage a database file: emptied, overwritten with text, or every page after the first (the schema table's)
    overwritten, so that its schema reads but its tables do not."""
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "not sqlite":
        data = bytearray(b"this is not a database\n" * 100)
    else:
        page = int.from_bytes(data[16:18], "big")
        data[page:] = b"\xab" * (len(data) - page)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("style", ["ddl", "ddl+rows", "mschema"])
@pytest.mark.parametrize("how", ["empty", "not sqlite", "damaged pages"])
def test_a_broken_database_is_named_once(tmp_path, demo_dir, capsys, style, how):
    """Pins: a database file that cannot be used (0 bytes, not SQLite, damaged pages) made `prepare --schema_style
    ddl/ddl+rows/mschema` stop with an internal error (`DatabaseError: file is not a database`, `no such table`),
    or (mschema) silently lose its example values question after question. Now the file is named in one warning
    (once, though train and dev both use it) and its schema is stated from tables.json, exactly as for an absent
    file. (ddl reads only the schema table, which damaged data pages leave readable: that file is used as is.)"""
    broken, absent = tmp_path / "broken", tmp_path / "absent"
    shutil.copytree(demo_dir, broken)
    shutil.copytree(demo_dir, absent)
    _break(broken / "database" / "shop" / "shop.sqlite", how)
    readable = how == "damaged pages" and style == "ddl"
    if not readable:
        (absent / "database" / "shop" / "shop.sqlite").unlink()
    args = ["--schema_style", style, "--sample_rows", "2"]
    code, _, err = run_cli(["prepare", "--data_dir", str(absent), "--out", str(tmp_path / "a"), *args], capsys)
    assert code == 0, err
    code, _, err = run_cli(["prepare", "--data_dir", str(broken), "--out", str(tmp_path / "b"), *args], capsys)
    assert code == 0 and "Traceback" not in err, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    if readable:
        assert not warnings, err
    else:
        assert len(warnings) == 1 and str(broken / "database" / "shop" / "shop.sqlite") in warnings[0], err
    for split in ("train", "dev"):
        got = [r for r in records(tmp_path / "b" / f"spider_{split}.jsonl") if r["db_id"] == "shop"]
        want = [r for r in records(tmp_path / "a" / f"spider_{split}.jsonl") if r["db_id"] == "shop"]
        assert got and got == want, split


def test_dev_sample_is_a_seeded_sample_of_questions_with_a_database(demo_dir, tmp_path, capsys):
    """Pins `prepare --dev_sample N`: `<name>_dev<N>` holds the records, gold and difficulty lines of N dev questions
    whose database exists, drawn with --seed by the rule benchmarks/spider_dev.py uses (sample_indices), so a
    recipe scores the benchmark's questions; a question without its database is never drawn; too few is all of
    them, said in a line; a multi-turn or dev-less preparation is one error line."""
    from sqltune.data.prepare import sample_indices

    data = tmp_path / "src"
    shutil.copytree(demo_dir, data)
    source_dev = json.loads((data / "dev.json").read_text())
    gone = source_dev[0]["db_id"]
    shutil.rmtree(data / "database" / gone)
    out = tmp_path / "o"
    figures = prepare(PrepareConfig(data_dir=str(data), out=str(out), dev_sample=5, seed=3))
    assert figures["dev_sample_records"] == 5
    entry = lookup(out, "spider_dev5")
    assert entry["records"] == 5 and entry["sample_of"] == "spider_dev" and entry["seed"] == 3
    has_db = [q["db_id"] != gone for q in source_dev]
    picked = sample_indices(has_db, 5, 3)
    assert all(has_db[i] for i in picked) and picked == sorted(picked)
    dev, sample = records(out / "spider_dev.jsonl"), records(out / "spider_dev5.jsonl")
    assert sample == [dev[i] for i in picked]
    gold = (out / "spider_dev_gold.sql").read_text().splitlines()
    assert (out / "spider_dev5_gold.sql").read_text().splitlines() == [gold[i] for i in picked]
    assert entry["gold"].endswith("spider_dev5_gold.sql")
    assert sample_indices(has_db, 5, 4) != picked  # another seed, another sample

    everything = sum(has_db)
    prepare(PrepareConfig(data_dir=str(data), out=str(tmp_path / "all"), dev_sample=100, splits="dev"))
    assert lookup(tmp_path / "all", "spider_dev100")["records"] == everything
    assert f"only {everything} dev questions have their database" in capsys.readouterr().err

    assert main(["prepare", "--data_dir", str(data), "--out", str(tmp_path / "t"), "--splits", "train",
                 "--dev_sample", "5"]) == 2
    assert "--dev_sample samples the dev split" in capsys.readouterr().err


def test_train_sample_spreads_over_the_train_split(demo_dir, tmp_path, capsys):
    """Pins `prepare --train_sample N`: `<name>_train<N>` holds the records of a seeded sample of N train questions
    (the draw --dev_sample makes, over the train split after --drop_failing_gold), in the split's order, with no
    gold file (the train split has none), so a recipe samples candidates for questions from many databases rather
    than the first N (Spider's train file runs database by database); without the train split: one error line."""
    from sqltune.data.prepare import sample_indices

    out = tmp_path / "o"
    figures = prepare(PrepareConfig(data_dir=str(demo_dir), out=str(out), train_sample=7, seed=5))
    assert figures["train_sample_records"] == 7
    entry = lookup(out, "spider_train7")
    assert entry["records"] == 7 and entry["sample_of"] == "spider_train" and entry["seed"] == 5
    assert "gold" not in entry
    train, sample = records(out / "spider_train.jsonl"), records(out / "spider_train7.jsonl")
    assert sample == [train[i] for i in sample_indices([True] * len(train), 7, 5)]
    assert not list(out.glob("spider_train7_gold.sql"))

    assert main(["prepare", "--data_dir", str(demo_dir), "--out", str(tmp_path / "t"), "--splits", "dev",
                 "--train_sample", "5"]) == 2
    assert "--train_sample samples the train split" in capsys.readouterr().err
