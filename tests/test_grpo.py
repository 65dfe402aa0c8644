"""train --stage grpo (issue 28 item 2): TRL's GRPOTrainer on the tiny random Llama and the demo databases, the
reward from sqltune/train/reward.py. A 2-step run writes an adapter, a log with the reward's mean and spread at every
step and its plot; prompts are predict's token ids; resume, the time budget, progress, `sqltune run`'s identity and
resume; the rollout backend's choice; bad input is one line."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
from conftest import Killed

import sqltune.train.grpo as grpo
from sqltune.cli import main
from sqltune.config import TrainConfig
from sqltune.errors import SqltuneError
from sqltune.loading import load_tokenizer
from sqltune.templates import encode_prompt, get_template
from sqltune.train.data import load_records
from sqltune.train.grpo_data import databases, prompt_rows

KW = dict(stage="grpo", dataset="demo_train", template="chatml", max_steps=2, save_steps=1, logging_steps=10,
          per_device_train_batch_size=2, num_generations=2, max_completion_length=8, learning_rate=1e-3,
          lora_dropout=0.0, reward_timeout=5.0, max_source_length=512)


def config(tiny_model, prepared_demo, out, **kw) -> TrainConfig:
    return TrainConfig(**{**KW, "model_name_or_path": str(tiny_model), "dataset_dir": str(prepared_demo),
                          "output_dir": str(out), **kw})


def log_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


@contextmanager
def grpo_killed_after_save(step: int):
    """Within the block, GRPO training dies right after it has written checkpoint-<step>."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == step:
                raise Killed()

    original = grpo.make_callbacks
    grpo.make_callbacks = lambda *a, **k: original(*a, **k) + [Kill()]
    try:
        yield
    finally:
        grpo.make_callbacks = original


def test_two_steps_write_an_adapter_and_the_reward_of_every_step(tiny_model, prepared_demo, tmp_path, capsys):
    out = tmp_path / "grpo"
    figures = grpo.train_grpo(config(tiny_model, prepared_demo, out, plot_loss=True))
    assert figures["steps"] == 2 and figures["rollout_backend"] == "hf" and figures["trainable_params"] > 0
    for name in ("adapter_model.safetensors", "tokenizer.json", "sqltune_train.yaml", "trainer_log.jsonl",
                 "training_loss.png", "training_reward.png", "train_figures.json"):
        assert (out / name).is_file(), name
    rows = [r for r in log_rows(out) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]  # every step, whatever --logging_steps says
    for r in rows:
        assert 0.0 <= r["reward"] <= 1.0 and r["reward_std"] >= 0.0 and "rewards/sql_execution/mean" in r
        assert sum(r[f"sql/{k}"] for k in ("match", "runs", "fails", "no_sql", "gold_failed")) == pytest.approx(1.0)
    assert figures["first_reward"] == rows[0]["reward"] and figures["final_reward"] == rows[-1]["reward"]
    record = (out / "sqltune_train.yaml").read_text()
    assert "stage: grpo" in record and "template_resolved: chatml" in record  # predict reads the prompt format
    err = capsys.readouterr().err  # stderr is a file here: progress lines, the reward shown
    assert "train: 2/2" in err and "reward " in err and "Traceback" not in err


def test_prompts_are_predicts_token_ids(tiny_model, prepared_demo):
    """The policy samples from the ids predict generates from (no second BOS, no re-tokenised text), each record
    with its gold and its database."""
    records = load_records(str(prepared_demo), "demo_train")[:5]
    dbs, bird = databases(str(prepared_demo), "demo_train", records)
    tok = load_tokenizer(tiny_model)
    template = get_template("chatml", tok)
    rows, ids_of, cut = prompt_rows(records, dbs, tok, template, 512)
    trainer_class = grpo.grpo_trainer_class(ids_of)
    given, _, _ = trainer_class._tokenize_prompts(None, rows["prompt"])
    assert given == [encode_prompt(tok, template, r, 512)[0] for r in records] and cut == 0 and not bird
    assert rows["gold"] == [r["output"] for r in records]
    assert rows["db_path"] == [str(d) for d in dbs]
    assert [d.name for d in dbs] == [f"{r['db_id']}.sqlite" for r in records] and all(d.is_file() for d in dbs)


def test_resume_continues_the_run_and_its_log(tiny_model, prepared_demo, tmp_path, capsys):
    """Killed after checkpoint-1, the resumed run trains step 2 only; the log holds each step's reward once. A
    resume with another GRPO setting is one line naming it."""
    out = tmp_path / "grpo"
    with grpo_killed_after_save(1), pytest.raises(Killed):
        grpo.train_grpo(config(tiny_model, prepared_demo, out))
    assert (out / "checkpoint-1").is_dir() and not (out / "train_figures.json").exists()
    with pytest.raises(SqltuneError, match=r"settings differ .*num_generations 2 -> 4"):
        grpo.train_grpo(config(tiny_model, prepared_demo, out, resume=True, num_generations=4,
                               per_device_train_batch_size=4))
    figures = grpo.train_grpo(config(tiny_model, prepared_demo, out, resume=True))
    assert figures["resumed_from_step"] == 1 and figures["steps"] == 2
    assert [r["step"] for r in log_rows(out) if "reward" in r] == [1, 2]
    assert "resuming from" in capsys.readouterr().err


def test_the_time_budget_stops_grpo(tiny_model, prepared_demo, tmp_path, monkeypatch, capsys):
    """--max_train_minutes stops GRPO as it stops SFT (a fake clock: one minute per reading) and says so."""
    import sqltune.train.budget as budget

    now = [0.0]

    def clock():
        now[0] += 60.0
        return now[0]

    monkeypatch.setattr(budget, "_now", clock)
    figures = grpo.train_grpo(config(tiny_model, prepared_demo, tmp_path / "cut", max_steps=5, max_train_minutes=1))
    assert figures["steps"] < figures["planned_steps"] == 5
    assert "the time budget stopped training" in capsys.readouterr().err


@pytest.mark.parametrize("found, gpu, choice, expected", [
    (True, True, "auto", "vllm"), (True, False, "auto", "hf"), (False, True, "auto", "hf"), (False, False, "auto", "hf"),
    (True, True, "hf", "hf"), (True, True, "vllm", "vllm")])
def test_the_rollout_backend_choice(found, gpu, choice, expected):
    assert grpo.rollout_backend(choice, vllm_found=found, gpu=gpu) == expected


def test_vllm_asked_for_where_it_cannot_run_is_one_line():
    with pytest.raises(SqltuneError, match="vLLM does not import"):
        grpo.rollout_backend("vllm", vllm_found=False, gpu=True)
    with pytest.raises(SqltuneError, match="needs a CUDA GPU"):
        grpo.rollout_backend("vllm", vllm_found=True, gpu=False)


def _cli(tiny_model, prepared_demo, out, *extra) -> list[str]:
    args = {**KW, "model_name_or_path": tiny_model, "dataset_dir": prepared_demo, "output_dir": out}
    return ["train", *[f"--{k}={v}" for k, v in args.items()], *extra]


@pytest.mark.parametrize("extra, message", [
    (["--per_device_train_batch_size=3"], "must be a multiple of --num_generations 2"),
    (["--num_generations=1", "--per_device_train_batch_size=2"], "--num_generations must be 2 or more"),
    (["--reward_shape=1,2"], "--reward_shape must be 3 or 4 numbers"),
    (["--grpo_loss_type=ppo"], "--grpo_loss_type must be one of"),
    (["--grpo_temperature=0"], "--grpo_temperature must be > 0"),
    (["--packing"], "--packing is for --stage sft"),
    (["--adapter=x", "--grpo_beta=0.1"], "--stage grpo --adapter needs --grpo_beta 0"),
    (["--adapter=x", "--finetuning_type=full"], "--adapter goes on training a LoRA adapter"),
])
def test_bad_settings_are_one_line(tiny_model, prepared_demo, tmp_path, capsys, extra, message):
    assert main(_cli(tiny_model, prepared_demo, tmp_path / "x", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_a_missing_database_is_one_line_before_anything_is_written(tiny_model, prepared_demo, tmp_path, capsys):
    import shutil

    data = tmp_path / "prepared"
    shutil.copytree(prepared_demo, data)
    info = json.loads((data / "dataset_info.json").read_text())
    info["demo_train"]["db_dir"] = str(tmp_path / "nowhere")
    (data / "dataset_info.json").write_text(json.dumps(info))
    assert main(_cli(tiny_model, data, tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "--stage grpo needs each record's database; missing:" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_vllm_asked_for_in_this_environment_is_one_line(tiny_model, prepared_demo, tmp_path, capsys):
    """.venv has no vLLM (it lives in .venv-vllm): asking for it is one line, nothing written."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM imports here")
    assert main(_cli(tiny_model, prepared_demo, tmp_path / "x", "--rollout_backend=vllm")) == 2
    err = capsys.readouterr().err
    assert "vLLM does not import" in err and err.count("\n") == 1 and not (tmp_path / "x").exists(), err


def test_run_resumes_grpo_and_keeps_its_identity(tmp_path, demo_dir, tiny_model):
    """`sqltune run` with `train: {stage: grpo}`: a run killed after checkpoint-1 continues from it; the finished
    stage is skipped on the next run; a changed GRPO setting (the reward's shape) trains again."""
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"""
name: grpo
stages: [prepare, train]
model_name_or_path: {tiny_model}
template: chatml
max_source_length: 512
prepare: {{source: spider, data_dir: {demo_dir}, name: demo}}
train: {{stage: grpo, max_steps: 2, save_steps: 1, per_device_train_batch_size: 2, num_generations: 2,
         max_completion_length: 8, learning_rate: 1.0e-3, reward_timeout: 5.0}}
""")
    run = tmp_path / "run"
    with grpo_killed_after_save(1):
        assert main(["run", str(recipe), "--run_dir", str(run)]) == 1
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    trace = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    train = [s for s in trace if s["stage"] == "train"]
    assert [s["status"] for s in train] == ["failed", "ok"]
    assert train[-1]["figures"]["resumed_from_step"] == 1 and train[-1]["figures"]["steps"] == 2
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()
            if json.loads(line)["stage"] == "train"][-1]["status"] == "skipped"
    assert main(["run", str(recipe), "--run_dir", str(run), "--train.reward_shape", "1,0,0"]) == 0
    last = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()
            if json.loads(line)["stage"] == "train"][-1]
    assert last["status"] == "ok" and last["figures"]["resumed_from_step"] == 0


def test_a_recipes_shared_temperature_stays_out_of_training(tmp_path):
    """Pins: GRPO's sampling temperature was TrainConfig.temperature, so a recipe's shared `temperature: 0` (meant for
    predict: run-level keys fill every stage field of that name) failed every train stage with `--temperature must
    be > 0`, and changing it re-ran training. It is grpo_temperature now, a name no other stage has."""
    from sqltune.config import build, recipe_values
    from sqltune.pipeline import identity

    values = recipe_values({"temperature": 0.0, "train": {"max_steps": 2}}, "train", TrainConfig)
    assert "temperature" not in values
    cfg = build(TrainConfig, values)
    changed = build(TrainConfig, recipe_values({"temperature": 0.7, "train": {"max_steps": 2}}, "train", TrainConfig))
    assert identity(cfg) == identity(changed)


@pytest.mark.parametrize("flags, named", [(["--num_generations=4"], "--num_generations is"),
                                          (["--reward_shape=1,0,0", "--grpo_beta=0.1"],
                                           "--grpo_beta, --reward_shape are")])
def test_grpo_settings_without_the_grpo_stage_are_one_line(tmp_path, capsys, flags, named):
    """A GRPO setting given to another stage is never silently ignored (the user probably forgot --stage grpo)."""
    assert main(["train", "--model_name_or_path", "m", "--dataset", "d", *flags]) == 2
    err = capsys.readouterr().err
    assert f"{named} for --stage grpo" in err and err.count("\n") == 1, err


def test_rewards_that_differ_move_the_adapter(tiny_model, prepared_demo, tmp_path, monkeypatch):
    """The policy-gradient path itself: with rewards that differ inside a group (a stand-in reward: the length of
    the completion's text), two steps leave LoRA's B matrices non-zero (they start at zero, and equal rewards give
    zero advantages, so an adapter that stayed at zero would be the base model)."""
    from safetensors.torch import load_file

    monkeypatch.setattr(grpo, "SqlReward", Lengths)
    out = tmp_path / "moved"
    grpo.train_grpo(config(tiny_model, prepared_demo, out, per_device_train_batch_size=4, num_generations=4))
    weights = load_file(out / "adapter_model.safetensors")
    b = [t for name, t in weights.items() if "lora_B" in name]
    assert b and any(bool(t.abs().sum() > 0) for t in b)
    assert any(r.get("reward_std", 0) > 0 for r in log_rows(out))


class Lengths:
    """A stand-in reward: the length of the completion's text (rewards that differ inside a group)."""
    __name__ = "lengths"

    def __init__(self, *a, **k):
        pass

    def __call__(self, prompts=None, completions=None, **kw):
        return [float(len(c)) for c in completions]

    def close(self):
        pass


def test_grpo_goes_on_training_an_sft_adapter(tiny_model, prepared_demo, tmp_path, monkeypatch):
    """Pins issue 28's "GRPO can only start from a merged model": --adapter (an SFT adapter of the base) goes on
    learning under GRPO (before, --adapter was refused outside dpo). The output is one adapter for the base with the
    starting adapter's own rank, its weights moved from the start, and the start's digest in the record."""
    import yaml
    from safetensors.torch import load_file

    from sqltune.train.dispatch import train

    sft_out = tmp_path / "sft"
    train(TrainConfig(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(prepared_demo),
                      template="chatml", output_dir=str(sft_out), max_steps=2, per_device_train_batch_size=4,
                      lora_rank=4, learning_rate=1e-2))
    monkeypatch.setattr(grpo, "SqlReward", Lengths)
    out = tmp_path / "grpo"
    figures = train(config(tiny_model, prepared_demo, out, adapter=str(sft_out), per_device_train_batch_size=4,
                           num_generations=4))
    assert figures["steps"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # the SFT adapter's rank, not --lora_rank
    start, end = load_file(sft_out / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert start.keys() == end.keys()
    assert any(not bool((start[k] == end[k]).all()) for k in start)  # it learned from there
    assert yaml.safe_load((out / "sqltune_train.yaml").read_text())["adapter_sha256"]


def test_grpo_adapter_that_is_no_adapter_is_one_line(tiny_model, prepared_demo, tmp_path, capsys):
    """--adapter naming a folder without adapter_config.json stops in one line, before the output is written."""
    (tmp_path / "plain").mkdir()
    assert main(_cli(tiny_model, prepared_demo, tmp_path / "x", f"--adapter={tmp_path / 'plain'}")) == 2
    err = capsys.readouterr().err
    assert "is not a LoRA adapter folder" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_checkpointing_is_switched_by_the_name_this_transformers_has():
    """Pins GRPO under transformers 5.19 (the pin of vLLM's CPU build, .venv-vllm): GRPOConfig got
    `activation_checkpointing`, a name 5.19's TrainingArguments lacks (a TypeError before training); and DPO passed
    `gradient_checkpointing`, which newer 5.x warns about. The keyword now follows the installed class."""
    from dataclasses import dataclass

    from sqltune.train.session import checkpointing

    @dataclass
    class Old:
        gradient_checkpointing: bool = False

    @dataclass
    class New(Old):
        activation_checkpointing: bool = False

    assert checkpointing(Old, True) == {"gradient_checkpointing": True}
    assert checkpointing(New, False) == {"activation_checkpointing": False}
