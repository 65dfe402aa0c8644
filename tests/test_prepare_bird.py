"""prepare --source bird: each split reads its own tables and databases, and records without a database are counted."""

from __future__ import annotations

import json
import shutil

import pytest
from bird_fixture import QUESTIONS, build_bird

from sqltune.config import PrepareConfig
from sqltune.data.prepare import prepare
from sqltune.data.registry import lookup
from sqltune.errors import SqltuneError


def records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture()
def bird(tmp_path):
    return build_bird(tmp_path / "bird")


@pytest.mark.parametrize("flat", [False, True])
def test_train_prompts_show_train_databases(tmp_path, flat):
    """Pins: train prompts looked databases up in dev_databases/ (one db_dir for all splits), so with ddl+rows they
    silently lost their sample rows and real column types."""
    bird = build_bird(tmp_path / "bird", flat=flat)
    out = tmp_path / "out"
    figures = prepare(PrepareConfig(source="bird", data_dir=str(bird), out=str(out), schema_style="ddl+rows",
                                    sample_rows=2))
    train = records(out / "bird_train.jsonl")
    text = train[0]["instruction"]
    assert "CREATE TABLE vendor (\n  vendor_id INTEGER,\n  vendor_name TEXT,\n  credit_rating INTEGER," in text
    assert "2 example rows from vendor:\n  1 | Trey Research | 1\n  2 | Contoso Bikes | 3\n*/" in text
    assert len(train) == 2 and figures["train_records_without_database"] == 0
    assert "##Evidence:\nbest credit rating refers to credit_rating = 1" in text
    dev = records(out / "bird_dev.jsonl")
    assert "2 example rows from hero:\n  1 | Nightcrawler | 175" in dev[0]["instruction"]


def test_each_split_registers_its_own_db_dir(bird, tmp_path):
    """Pins: the registry held one db_dir (dev's) for train and dev, so anything reading train's databases
    through the registry read the wrong folder."""
    out = tmp_path / "out"
    prepare(PrepareConfig(source="bird", data_dir=str(bird), out=str(out)))
    train, dev = lookup(out, "bird_train"), lookup(out, "bird_dev")
    assert train["db_dir"] == str((bird / "train" / "train_databases").resolve())
    assert dev["db_dir"] == str((bird / "dev" / "dev_databases").resolve())
    assert train["tables"].endswith("train_tables.json") and dev["tables"].endswith("dev_tables.json")
    assert (out / "bird_dev_difficulty.txt").read_text() == "simple\nmoderate\nchallenging\n"
    assert "difficulty" not in train and "gold" not in train


def test_sql_kept_and_gold_one_line(bird, tmp_path):
    """Pins: BIRD SQL was folded in the records; records keep the source text, the gold file has one line each."""
    out = tmp_path / "out"
    prepare(PrepareConfig(source="bird", data_dir=str(bird), out=str(out)))
    assert [r["output"] for r in records(out / "bird_train.jsonl")] == [q["SQL"] for q in QUESTIONS["train"]]
    gold = (out / "bird_dev_gold.sql").read_text().splitlines()
    assert gold == [f"{q['SQL']}\tsuperhero" for q in QUESTIONS["dev"]]


def test_missing_databases_are_counted_per_split(bird, tmp_path):
    """Pins: a record whose database is absent was prepared silently (a ddl prompt from tables.json alone)."""
    shutil.rmtree(bird / "train" / "train_databases" / "works_cycles")
    figures = prepare(PrepareConfig(source="bird", data_dir=str(bird), out=str(tmp_path / "out")))
    assert figures["train_records_without_database"] == 2 and figures["dev_records_without_database"] == 0
    assert figures["missing_databases"] == ["works_cycles"]


def test_dev_only_folder_prepares_dev_and_says_train_is_missing(tmp_path, capsys):
    """Pins: a BIRD folder with only the dev download failed on the missing train files."""
    bird = build_bird(tmp_path / "bird", splits=("dev",))
    figures = prepare(PrepareConfig(source="bird", data_dir=str(bird), out=str(tmp_path / "out")))
    assert figures["missing_splits"] == "train" and figures["dev_records"] == 3 and "train_records" not in figures
    assert "no train split" in capsys.readouterr().err
    with pytest.raises(SqltuneError, match="none of the BIRD splits"):
        prepare(PrepareConfig(source="bird", data_dir=str(bird), out=str(tmp_path / "o2"), splits="train"))


def test_flat_layout_registers_each_splits_db_dir(tmp_path):
    """Pins: with the files directly in the data folder, train was registered with dev_databases/."""
    bird = build_bird(tmp_path / "bird", flat=True)
    figures = prepare(PrepareConfig(source="bird", data_dir=str(bird), out=str(tmp_path / "out")))
    assert figures["train_records_without_database"] == 0 and figures["dev_records_without_database"] == 0
    assert lookup(tmp_path / "out", "bird_train")["db_dir"] == str((bird / "train_databases").resolve())
