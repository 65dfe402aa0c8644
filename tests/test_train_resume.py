"""train --resume: the checkpoint's settings are compared first, a checkpoint cut by a kill is skipped, and the
figures of a resumed run describe the whole run (issue #12 section 5, issue #13 section 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import Killed, training_killed_after_save
from test_train import config

from sqltune.cli import main
from sqltune.train.sft import train

KW = dict(max_steps=6, save_steps=3, per_device_train_batch_size=2, save_total_limit=5)


def cut_after(step, tiny_model, prepared_demo, out, **kw):
    """A run killed right after it wrote checkpoint-<step>."""
    with training_killed_after_save(step), pytest.raises(Killed):
        train(config(tiny_model, prepared_demo, out, **{**KW, **kw}))


def test_resumed_figures_cover_the_whole_run(tiny_model, prepared_demo, tmp_path):
    """Pins: after a resume final_loss equalled first_loss (only step 1 was ever logged with logging_steps 10), the
    mean loss covered only the resumed part, and tokens_seen dropped (1530 -> 1043)."""
    full = train(config(tiny_model, prepared_demo, tmp_path / "full", logging_steps=10, **KW))
    cut_after(3, tiny_model, prepared_demo, tmp_path / "cut", logging_steps=10)
    resumed = train(config(tiny_model, prepared_demo, tmp_path / "cut", logging_steps=10, resume=True, **KW))
    assert resumed["final_loss"] != resumed["first_loss"]
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    for key in ("first_loss", "final_loss", "train_loss"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key
    assert resumed["tokens_seen"] == full["tokens_seen"] > 0
    log = [json.loads(line) for line in (tmp_path / "cut" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 3, 6]  # first step, each checkpoint and the last step
    assert json.loads((tmp_path / "cut" / "train_figures.json").read_text())["tokens_seen"] == full["tokens_seen"]


def test_resume_with_other_settings_is_one_line(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: `--resume --lora_rank 8` on a rank-16 checkpoint printed ~270 lines of tensor-shape errors as an
    internal error. The settings are saved at the start (so a killed run has them) and compared first."""
    out = tmp_path / "out"
    cut_after(3, tiny_model, prepared_demo, out, lora_rank=16)
    assert yaml.safe_load((out / "sqltune_train.yaml").read_text())["lora_rank"] == 16
    capsys.readouterr()
    base = ["train", "--model_name_or_path", str(tiny_model), "--dataset", "demo_train", "--dataset_dir",
            str(prepared_demo), "--template", "chatml", "--output_dir", str(out), "--max_steps", "6", "--save_steps",
            "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lora_dropout", "0", "--resume"]
    assert main(base + ["--lora_rank", "8", "--learning_rate", "5e-4"]) == 2
    err = capsys.readouterr().err
    assert "lora_rank 16 -> 8" in err and "learning_rate 0.001 -> 0.0005" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # execution-only settings may change: the same run continues
    assert main(base + ["--lora_rank", "16", "--logging_steps", "2", "--save_total_limit", "3"]) == 0
    assert "steps=6" in capsys.readouterr().out


def test_resume_skips_a_checkpoint_cut_by_a_kill(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: a kill -9 while checkpoint-6 was being written left it incomplete, and --resume (like every later
    `sqltune run`) failed on it although checkpoint-3 was valid. The run resumes checkpoint-3 and names the one
    it skipped."""
    out = tmp_path / "out"
    cut_after(3, tiny_model, prepared_demo, out)
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # the save was cut here
    figures = train(config(tiny_model, prepared_demo, out, resume=True, **KW))
    assert figures["resumed_from_step"] == 3 and figures["steps"] == 6
    assert "checkpoint-6 is incomplete" in capsys.readouterr().err
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()  # written afresh by the resumed run


def test_resume_without_a_complete_checkpoint_is_one_line(tiny_model, prepared_demo, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    assert main(["train", "--model_name_or_path", str(tiny_model), "--dataset", "demo_train", "--dataset_dir",
                 str(prepared_demo), "--template", "chatml", "--output_dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "incomplete: checkpoint-2" in err and err.count("\n") == 1


def test_run_continues_from_the_latest_complete_checkpoint(tiny_model, demo_dir, tmp_path):
    """Pins: `sqltune run` after a kill during a checkpoint save resumed the incomplete checkpoint and failed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: cut
stages: [prepare, train]
model_name_or_path: {tiny_model}
template: chatml
prepare: {{source: spider, data_dir: {demo_dir}, name: demo}}
train: {{max_steps: 3, per_device_train_batch_size: 2, save_steps: 1, learning_rate: 1.0e-3, save_total_limit: 5}}
""")
    runs = tmp_path / "runs"
    with training_killed_after_save(2):
        assert main(["run", str(recipe), "--runs_dir", str(runs)]) == 1
    (run,) = list(runs.iterdir())
    (run / "adapter" / "checkpoint-2" / "trainer_state.json").unlink()  # as if killed while writing checkpoint-2
    assert main(["run", str(recipe), "--runs_dir", str(runs)]) == 0
    spans = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    train_spans = [s for s in spans if s["stage"] == "train"]
    assert train_spans[-1]["status"] == "ok"
    assert train_spans[-1]["figures"]["resumed_from_step"] == 1 and train_spans[-1]["figures"]["steps"] == 3


def test_resume_after_inputs_changed_in_place_is_one_line(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: `train --resume` compared the saved settings and the *paths* of its inputs, not what they held. With the
    training records edited in place (a gold query corrected, a record dropped) or the base model folder rewritten
    under the same path, it continued the checkpoint on other data without a word. The digests of the records read
    and of the model's files are saved with the settings; a mismatch is one line, naming what changed."""
    import shutil

    from sqltune.data.registry import lookup

    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(prepared_demo, data)
    shutil.copytree(tiny_model, model)
    out = tmp_path / "out"
    cut_after(3, model, data, out)
    args = ["train", "--model_name_or_path", str(model), "--dataset", "demo_train", "--dataset_dir", str(data),
            "--template", "chatml", "--output_dir", str(out), "--max_steps", "6", "--save_steps", "3",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lora_dropout", "0", "--resume"]
    records = Path(lookup(data, "demo_train")["file_name"])
    assert records.resolve().is_relative_to(data.resolve())  # the copy is edited, not the shared fixture
    original = records.read_text()
    lines = original.splitlines(keepends=True)
    records.write_text("".join(lines[1:]))  # one record dropped, same path
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "training records changed" in err and "base model" not in err
    assert err.count("\n") == 1 and "Traceback" not in err

    records.write_text(original)
    config_file = model / "config.json"
    config_file.write_text(config_file.read_text().replace("{", '{"note": "rewritten",', 1))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "base model folder's files changed" in err and "training records" not in err and err.count("\n") == 1

    shutil.copy(tiny_model / "config.json", config_file)  # both as they were: the same run continues
    assert main(args) == 0
    assert "steps=6" in capsys.readouterr().out
