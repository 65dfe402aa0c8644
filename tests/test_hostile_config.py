"""Bad config values get one clear line, never a silent change of meaning or a traceback (issue #13, section 3)."""

from __future__ import annotations

import pytest

from sqltune.cli import main
from sqltune.config import PredictConfig, TrainConfig, build, load
from sqltune.errors import SqltuneError


def refused(cls, values: dict, words: str) -> None:
    with pytest.raises(SqltuneError) as info:
        build(cls, values)
    message = str(info.value)
    assert "\n" not in message and words in message, message


def test_max_steps_zero_is_refused():
    """`--max_steps 0` trained 1 step: -1 means "use the epochs", 0 is an error."""
    refused(TrainConfig, {"max_steps": "0"}, "--max_steps must be > 0, or -1")
    assert build(TrainConfig, {"max_steps": "-1"}).max_steps == -1


def test_non_integral_int_is_refused():
    """`--max_steps 1.5e0` became 1 silently; integral spellings such as 1e3 stay accepted."""
    refused(TrainConfig, {"max_steps": "1.5e0"}, "--max_steps expects a whole number")
    refused(TrainConfig, {"max_steps": 2.5}, "--max_steps expects a whole number")
    assert build(TrainConfig, {"max_steps": "1e3"}).max_steps == 1000
    assert build(TrainConfig, {"max_steps": 20.0}).max_steps == 20


def test_bool_is_not_a_number():
    """`lora_rank: true` in YAML became rank 1."""
    refused(TrainConfig, {"lora_rank": True}, "--lora_rank expects a whole number")
    refused(TrainConfig, {"learning_rate": True}, "--learning_rate expects a number")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", float("inf")])
def test_non_finite_floats_are_refused(value):
    """`--learning_rate inf` trained to all-NaN weights with exit code 0."""
    refused(TrainConfig, {"learning_rate": value}, "--learning_rate must be a finite number")


def test_bool_text_is_parsed():
    """A bool written as text means what it says; anything else is an error, not true."""
    assert build(TrainConfig, {"bf16": "false"}).bf16 is False
    assert build(TrainConfig, {"bf16": "yes"}).bf16 is True
    refused(TrainConfig, {"bf16": "maybe"}, "--bf16 expects true or false")


def test_list_is_not_a_string():
    """`template: [chatml]` became the string "['chatml']"."""
    refused(PredictConfig, {"template": ["chatml"]}, "--template expects a single text value")


def test_predict_top_p_and_source_length_ranges():
    """`--top_p 5` was accepted (predict's --max_source_length 0 now means "the training value"; below is refused)."""
    refused(PredictConfig, {"top_p": "5"}, "--top_p must be in (0, 1]")
    refused(PredictConfig, {"top_p": "0"}, "--top_p must be in (0, 1]")
    refused(PredictConfig, {"max_source_length": "-1"}, "--max_source_length must be > 0")


def test_yaml_null_for_a_required_option(tmp_path):
    """A YAML null for an option without a None meaning is one line naming it."""
    path = tmp_path / "t.yaml"
    path.write_text("learning_rate: null\n")
    with pytest.raises(SqltuneError, match="--learning_rate needs a value"):
        load(TrainConfig, str(path))


@pytest.mark.parametrize("text, words", [
    ("train: [1, 2]\n", "the `train` section must be a mapping"),
    ("- a\n- b\n", "must hold a mapping of option names to values, not list"),
    ("just text\n", "must hold a mapping of option names to values, not str"),
    ("train: {max_steps: 2\n", "malformed YAML"),
    ("1: 2\n", "unknown"),
])
def test_malformed_recipes_are_one_line(tmp_path, capsys, text, words):
    """A YAML section that is a list, a non-mapping or malformed YAML: one line on stderr, exit 2, for run and train."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for command in ("run", "train"):
        assert main([command, str(path), "--runs_dir", str(tmp_path / "runs")] if command == "run"
                    else [command, str(path)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_non_utf8_yaml_is_one_line(tmp_path, capsys):
    """A binary file given as the recipe was an internal error (UnicodeDecodeError)."""
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    assert main(["run", str(path)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("text, words", [
    ("stages: []\n", "`stages` must name at least one stage"),
    ("stages: 5\n", "`stages` must be a list"),
    ("compare_base: maybe\n", "--compare_base expects true or false"),
    ("name: ../../x\n", "`name` must be a plain name"),
    ("name: .hidden\n", "`name` must be a plain name"),
])
def test_bad_run_level_values(tmp_path, capsys, text, words):
    """`stages: []` ran every stage; a path in `name` wrote outside the runs folder."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main(["run", str(path), "--runs_dir", str(tmp_path / "runs")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "x").exists()


def test_compare_base_text_false_means_false(tmp_path):
    """`compare_base: "false"` (a quoted string) meant true."""
    from sqltune.pipeline import read_plan

    path = tmp_path / "r.yaml"
    path.write_text('compare_base: "false"\n')
    assert read_plan(str(path)).compare_base is False
    path.write_text("compare_base: 'yes'\n")
    assert read_plan(str(path)).compare_base is True
