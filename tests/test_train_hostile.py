"""train against a careless user: no input and no finished output is ever destroyed, bad values and broken model
folders are one line, a non-finite loss stops training, and a log file gets readable progress lines (issue #13
sections 1 and 3, issue #11 section 5)."""

from __future__ import annotations

import shutil

import pytest
from conftest import Killed, training_killed_after_save
from test_train import config

from sqltune.cli import main
from sqltune.config import TrainConfig
from sqltune.train.sft import train


def cli(model, data, out, *extra):
    return ["train", "--model_name_or_path", str(model), "--dataset", "demo_train", "--dataset_dir", str(data),
            "--template", "chatml", "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", *extra]


def one_line(capsys, message):
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture
def own_inputs(tiny_model, prepared_demo, tmp_path):
    """Copies of the model and the prepared data, so a regression cannot destroy the shared fixtures."""
    model, data = tmp_path / "models" / "tiny", tmp_path / "data" / "prepared"
    shutil.copytree(tiny_model, model)
    shutil.copytree(prepared_demo, data)
    return model, data


def digest(folder):
    """Every file's bytes, but the command's own trace line (sqltune/trace.py writes it beside the output)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "trace.jsonl"}


@pytest.mark.parametrize("where", ["model", "dataset", "model_parent", "dataset_parent", "inside_model"])
def test_output_overlapping_an_input_is_refused(own_inputs, tmp_path, capsys, where):
    """Pins: `--overwrite_output_dir` with --output_dir equal to the model folder, the dataset folder or a parent of
    either deleted that input before anything was checked (model folder gone, then an OSError from the hub)."""
    model, data = own_inputs
    out = {"model": model, "dataset": data, "model_parent": model.parent, "dataset_parent": data.parent,
           "inside_model": model / "adapter"}[where]
    before = digest(tmp_path)
    assert main(cli(model, data, out, "--overwrite_output_dir")) == 2
    one_line(capsys, "choose another --output_dir")
    assert digest(tmp_path) == before


def test_a_typo_never_deletes_the_previous_adapter(own_inputs, tmp_path, capsys):
    """Pins: `--dataset demo_trian --overwrite_output_dir` deleted the previous adapter, then failed on the name."""
    model, data = own_inputs
    out = tmp_path / "adapter"
    assert main(cli(model, data, out)) == 0
    before = digest(out)
    capsys.readouterr()
    args = cli(model, data, out, "--overwrite_output_dir")
    args[args.index("demo_train")] = "demo_trian"
    assert main(args) == 2
    one_line(capsys, "unknown dataset 'demo_trian'")
    assert main(cli(tmp_path / "no_model", data, out, "--overwrite_output_dir")) == 2
    one_line(capsys, "model folder not found")
    assert digest(out) == before


def test_old_output_is_replaced_only_by_a_complete_one(tiny_model, prepared_demo, tmp_path):
    """Pins: --overwrite_output_dir removed the finished adapter at the start, so a run killed later left nothing.
    Now the new run works beside it (`<out>.partial`), --resume continues there, the finish renames it into place."""
    out = tmp_path / "adapter"
    kw = dict(max_steps=2, save_steps=1, per_device_train_batch_size=2)
    train(config(tiny_model, prepared_demo, out, **kw))
    before = digest(out)
    with training_killed_after_save(1), pytest.raises(Killed):
        train(config(tiny_model, prepared_demo, out, overwrite_output_dir=True, seed=7, **kw))
    assert digest(out) == before
    partial = tmp_path / "adapter.partial"
    assert (partial / "checkpoint-1" / "trainer_state.json").is_file()
    figures = train(config(tiny_model, prepared_demo, out, resume=True, seed=7, **kw))
    assert figures["resumed_from_step"] == 1 and not partial.exists()
    assert (out / "train_figures.json").is_file() and (out / "checkpoint-2").is_dir()
    assert digest(out)["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".adapter", "adapter"))] == ["adapter"]


@pytest.mark.parametrize("extra, message", [
    (["--max_steps", "0"], "--max_steps must be > 0, or -1"),
    (["--lora_dropout", "2"], "--lora_dropout must be in [0, 1)"),
    (["--lr_scheduler_type", "cosin"], "--lr_scheduler_type must be one of linear, cosine,"),
    (["--finetuning_type", "full", "--quantization_bit", "4"], "--quantization_bit needs --finetuning_type lora"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1)"),
])
def test_bad_values_are_one_line(tiny_model, prepared_demo, tmp_path, capsys, extra, message):
    """Pins: --max_steps 0 trained 1 step, lora_dropout 2 and an unknown scheduler were internal errors,
    full + 4-bit silently ignored the quantization, learning_rate inf trained to NaN weights with rc 0."""
    assert main(cli(tiny_model, prepared_demo, tmp_path / "out", *extra)) == 2
    one_line(capsys, message)
    assert not (tmp_path / "out").exists()


def test_python_api_refuses_non_finite_numbers():
    with pytest.raises(Exception, match="must be a finite number"):
        TrainConfig(learning_rate=float("inf"))


def test_schedulers_are_transformers_schedulers_that_build_alone():
    """The names offered are transformers.SchedulerType members that build with warmup and steps only."""
    import torch
    from transformers import SchedulerType, get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert set(TrainConfig.SCHEDULERS) <= {s.value for s in SchedulerType}
    for name in TrainConfig.SCHEDULERS:
        get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=10)


def test_broken_model_folders_are_one_line(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: a model folder without a tokenizer, or with a truncated safetensors file, was an internal error."""
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_model, no_tok)
    for f in no_tok.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            f.unlink()
    assert main(cli(no_tok, prepared_demo, tmp_path / "a")) == 2
    one_line(capsys, f"cannot load a tokenizer from {no_tok}")
    cut = tmp_path / "cut_weights"
    shutil.copytree(tiny_model, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(cli(cut, prepared_demo, tmp_path / "b")) == 2
    one_line(capsys, f"cannot load the model weights in {cut}")


def test_non_finite_loss_stops_training_with_one_line(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: a diverging run (here learning_rate 1e30) trained on to NaN weights and exited 0."""
    out = tmp_path / "out"
    assert main(cli(tiny_model, prepared_demo, out, "--max_steps", "4", "--logging_steps", "1", "--learning_rate",
                    "1e30")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "training stopped at step" in err[-1] and "the loss is nan" in err[-1]
    assert not (out / "train_figures.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_progress_in_a_log_is_lines_with_time_left_and_loss(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: with stderr not a terminal (a log file), the Trainer's progress bar showed only its first frame and raw
    log dicts went to stdout; now whole lines `train: N/M [elapsed<remaining, rate, loss X, lr Y, tokens/s Z]`, the
    last one for the last step (a quick run prints only that one)."""
    assert main(cli(tiny_model, prepared_demo, tmp_path / "out", "--max_steps", "3", "--logging_steps", "1")) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("train: ")]
    assert lines and lines[-1].split()[1] == "3/3" and "<00:00" in lines[-1]
    assert all(", loss " in line and ", lr " in line and ", tokens/s " in line for line in lines)
    assert "it/s" not in captured.err and "{'loss'" not in captured.out
    assert [line for line in captured.out.splitlines() if line.startswith("train:")] != []


def test_output_holding_the_fsdp_config_is_refused(own_inputs, tmp_path, capsys):
    """Pins: the FSDP settings file was not among train's inputs, so `--output_dir` holding it with
    `--overwrite_output_dir` would replace that folder, config included."""
    model, data = own_inputs
    folder = tmp_path / "settings"
    folder.mkdir()
    (folder / "fsdp.json").write_text("{}")
    assert main(cli(model, data, folder, "--overwrite_output_dir", "--fsdp", "full_shard",
                    "--fsdp_config", str(folder / "fsdp.json"))) == 2
    one_line(capsys, "choose another --output_dir")
    assert (folder / "fsdp.json").read_text() == "{}"
