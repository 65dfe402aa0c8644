"""The Python API and the recipe rules every command shares (issue #11)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sqltune.cli import main
from sqltune.errors import SqltuneError

ROOT = Path(__file__).resolve().parents[1]


def test_python_api_example(demo_dir, tiny_model, tmp_path):
    """README's ten-line example: prepare, train, predict, evaluate from Python, each returning its figures."""
    from sqltune import evaluate, predict, prepare, train

    prepare(source="demo", data_dir=str(demo_dir), out=str(tmp_path / "data"))
    trained = train(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(tmp_path / "data"),
                    output_dir=str(tmp_path / "adapter"), max_steps=2, template="chatml")
    predicted = predict(model_name_or_path=str(tiny_model), adapter=str(tmp_path / "adapter"), dataset="demo_dev",
                        dataset_dir=str(tmp_path / "data"), out=str(tmp_path / "pred.sql"), max_new_tokens=8,
                        template="chatml")
    scores = evaluate(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "data" / "demo_dev_gold.sql"),
                      db_dir=str(demo_dir / "database"), tables=str(demo_dir / "tables.json"), quiet=True)
    assert trained["steps"] == 2 and predicted["records"] == 30 and scores["count"] == 30
    assert 0.0 <= scores["ex"] <= 1.0


def test_api_unknown_keyword_is_one_line():
    import pytest

    from sqltune import prepare
    from sqltune.errors import SqltuneError

    with pytest.raises(SqltuneError, match="did you mean --schema_style"):
        prepare(schema_styl="ddl")


def test_stage_command_reads_a_run_recipe(capsys):
    """Pins issue #11 §4: `sqltune train RECIPE --learning_rate 1e-4` failed with "--model_name_or_path is required"
    and, given the model, silently used template auto and 1024 source tokens instead of the recipe's chatml/512."""
    assert main(["train", str(ROOT / "configs" / "spider_qwen05.yaml"), "--learning_rate", "1e-4",
                 "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model_name_or_path"] == "qwen2.5-coder-0.5b-instruct"
    assert cfg["template"] == "chatml" and cfg["max_source_length"] == 768
    assert cfg["learning_rate"] == 1e-4 and cfg["lora_rank"] == 16
    assert cfg["dataset"] == "spider_train"


def test_every_stage_prints_its_config(capsys):
    for stage in ("prepare", "train", "merge", "predict", "evaluate"):
        assert main([stage, str(ROOT / "configs" / "demo.yaml"), "--print_config"]) == 0, stage
        assert isinstance(yaml.safe_load(capsys.readouterr().out), dict)


def test_recipe_section_that_is_a_list_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ntrain: [1, 2]\n")
    assert main(["train", str(recipe)]) == 2
    assert "`train` section must be a mapping" in capsys.readouterr().err


def test_merge_reads_the_base_from_the_adapter(tiny_model, prepared_demo, tmp_path):
    """`merge` without --model_name_or_path takes the base model named in adapter_config.json."""
    assert main(["train", "--model_name_or_path", str(tiny_model), "--dataset", "demo_train", "--dataset_dir",
                 str(prepared_demo), "--output_dir", str(tmp_path / "a"), "--max_steps", "1"]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()


def test_help_texts_speak_to_users(capsys):
    for command in (["trace", "--help"], ["models", "--help"]):
        main(command)
        out = capsys.readouterr().out
        assert "dbgpt" not in out and "tests use" not in out


def test_train_stays_the_api_function_after_the_training_package_loads():
    """Pins: `from sqltune import train` gave the `sqltune.train` package (TypeError: 'module' object is not
    callable) once any training code had been imported."""
    import sqltune
    import sqltune.train.sft as sft  # the `import a.b.c as x` form keeps working too

    assert callable(sqltune.train) and callable(sft.train)
    from sqltune import train

    with pytest.raises(SqltuneError, match="did you mean --max_steps"):
        train(max_step=1)
