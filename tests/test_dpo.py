"""`train --stage dpo` (issue 28 item 2): TRL's DPOTrainer on the pairs `sqltune samples` made, with our templates,
LoRA from scratch or from an SFT adapter, and SFT's resume, record, progress and one-line errors."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import pytest
import yaml
from conftest import Killed
from test_pipeline_identity import calls  # noqa: F401 (fixture: stand-in stages)

import sqltune.train.dpo as dpo
from sqltune.cli import main
from sqltune.config import SamplesConfig, TrainConfig
from sqltune.digest import records_digest
from sqltune.loading import load_tokenizer
from sqltune.samples import samples
from sqltune.templates import encode_example, encode_preference, get_template
from sqltune.train.dispatch import train

QUESTIONS = 8


@pytest.fixture
def pairs_data(prepared_demo, tmp_path):
    """A copy of the prepared demo data with `demo_samples` registered by `sqltune samples`: for each of the first
    8 train questions predict's raw file holds the gold SQL (right), a query with a wrong result and one that fails."""
    data = tmp_path / "data"
    shutil.copytree(prepared_demo, data)
    records = [json.loads(line) for line in (data / "demo_train.jsonl").read_text().splitlines()][:QUESTIONS]
    rows = [{"index": i, "db_id": r["db_id"], "sql": r["output"], "vote": {"candidates": [
        {"source": "greedy", "sql": r["output"]}, {"source": "sample", "sql": "SELECT 1"},
        {"source": "sample", "sql": "SELECT * FROM no_such_table"}]}} for i, r in enumerate(records)]
    raw = tmp_path / "pred" / "train.sql.raw.jsonl"
    raw.parent.mkdir()
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw.with_name("train.sql.meta.json").write_text(json.dumps({
        "records": QUESTIONS, "records_sha256": records_digest(records), "about": {"dataset": "demo_train"}}))
    figures = samples(SamplesConfig(samples=str(raw), dataset_dir=str(data), name="demo_samples", workers=1,
                                    quiet=True, max_pairs_per_question=2))
    assert figures["pairs"] == 2 * figures["questions_with_right"] > 0
    return data


def config(model, data, out, **kw):
    base = dict(stage="dpo", model_name_or_path=str(model), dataset="demo_samples", dataset_dir=str(data),
                template="chatml", output_dir=str(out), max_steps=2, logging_steps=1, save_steps=1,
                per_device_train_batch_size=2, learning_rate=1e-3, lora_dropout=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_a_pair_is_encoded_as_sft_encodes_its_right_answer(tiny_model, pairs_data):
    """The prompt and the answer's end of a pair are exactly an SFT record's: prompt_ids + chosen_ids are the
    input_ids of the record whose output is the chosen SQL."""
    tok = load_tokenizer(tiny_model)
    template = get_template("chatml", tok)
    pair = json.loads((pairs_data / "demo_samples_pairs.jsonl").read_text().splitlines()[0])
    ex = encode_preference(tok, template, pair, 512, 64)
    sft = encode_example(tok, template, {**pair, "output": pair["chosen"]}, 512, 64)
    assert ex["prompt_ids"] + ex["chosen_ids"] == sft["input_ids"]
    assert tok.decode(ex["rejected_ids"]) == pair["rejected"] + template.answer_end(tok)  # SFT's end, no eos added


def test_dpo_trains_two_steps_and_writes_an_adapter(tiny_model, pairs_data, tmp_path):
    out = tmp_path / "dpo"
    figures = train(config(tiny_model, pairs_data, out, plot_loss=True))
    assert figures["steps"] == 2 and figures["pairs"] == 2 * QUESTIONS and figures["trainable_params"] > 0
    assert figures["reward_accuracy"] is not None
    assert figures["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the reference is the starting model
    for name in ("adapter_model.safetensors", "tokenizer.json", "sqltune_train.yaml", "trainer_log.jsonl",
                 "training_loss.png", "train_figures.json"):
        assert (out / name).is_file(), name
    assert not (out / dpo.REFERENCE).exists()
    record = yaml.safe_load((out / "sqltune_train.yaml").read_text())
    assert record["stage"] == "dpo" and record["template_resolved"] == "chatml"  # predict reads the prompt format
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]


@pytest.mark.parametrize("kind", ["qlora", "full"])
def test_dpo_trains_each_finetuning_type(tiny_model, pairs_data, tmp_path, kind):
    """QLoRA (a 4-bit base, the reference its adapter turned off) and full fine-tuning (TRL loads the model again as
    the reference) train as LoRA does."""
    out = tmp_path / kind
    figures = train(config(tiny_model, pairs_data, out, finetuning_type=kind, max_steps=1))
    assert figures["steps"] == 1 and figures["first_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert (out / ("adapter_model.safetensors" if kind == "qlora" else "model.safetensors")).is_file()


def test_dpo_goes_on_training_an_sft_adapter(tiny_model, prepared_demo, pairs_data, tmp_path):
    """--adapter: the SFT adapter is trained further against its frozen copy; the output is one adapter for the
    base (the copy is not saved)."""
    sft_out = tmp_path / "sft"
    train(TrainConfig(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(prepared_demo),
                      template="chatml", output_dir=str(sft_out), max_steps=3, per_device_train_batch_size=4,
                      lora_rank=4, learning_rate=1e-2))  # far enough from the base that a base reference shows
    out = tmp_path / "dpo"
    figures = train(config(tiny_model, pairs_data, out, adapter=str(sft_out)))
    assert figures["steps"] == 2
    assert figures["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the SFT adapter, not the base
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4  # the starting adapter's own rank, not --lora_rank
    assert not (out / dpo.REFERENCE).exists()
    assert yaml.safe_load((out / "sqltune_train.yaml").read_text())["adapter_sha256"]


@contextmanager
def killed_after_save(step: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == step:
                raise Killed()

    original = dpo.make_callbacks
    dpo.make_callbacks = lambda *a, **k: original(*a, **k) + [Kill()]
    try:
        yield
    finally:
        dpo.make_callbacks = original


def test_dpo_resumes(tiny_model, pairs_data, tmp_path, capsys):
    """A DPO run killed after its first checkpoint resumes there, with the whole run's figures; other DPO settings
    are one line."""
    full = train(config(tiny_model, pairs_data, tmp_path / "full"))
    out = tmp_path / "cut"
    with killed_after_save(1), pytest.raises(Killed):
        train(config(tiny_model, pairs_data, out))
    capsys.readouterr()
    assert main(["train", "--stage", "dpo", "--model_name_or_path", str(tiny_model), "--dataset", "demo_samples",
                 "--dataset_dir", str(pairs_data), "--template", "chatml", "--output_dir", str(out),
                 "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate",
                 "1e-3", "--lora_dropout", "0", "--resume", "--dpo_beta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "dpo_beta 0.1 -> 0.5" in err and err.count("\n") == 1, err
    resumed = train(config(tiny_model, pairs_data, out, resume=True))
    assert resumed["resumed_from_step"] == 1 and resumed["steps"] == 2
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-5)


def one_line(capsys, words):
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err, err


def cli(model, data, out, *extra):
    return ["train", "--stage", "dpo", "--model_name_or_path", str(model), "--dataset_dir", str(data),
            "--template", "chatml", "--output_dir", str(out), "--max_steps", "1", *extra]


def test_one_line_errors(tiny_model, pairs_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(cli(tiny_model, pairs_data, out, "--dataset", "demo_train")) == 2
    one_line(capsys, "dataset 'demo_train' has no preference pairs")
    assert main(["train", "--model_name_or_path", "m", "--dataset", "d", "--dpo_beta", "0.3"]) == 2
    one_line(capsys, "--dpo_beta and --pref_loss are for --stage dpo")
    assert main(cli(tiny_model, pairs_data, out, "--dataset", "demo_samples", "--adapter", str(tmp_path))) == 2
    one_line(capsys, "is not a LoRA adapter folder")
    (pairs_data / "demo_samples_pairs.jsonl").unlink()
    assert main(cli(tiny_model, pairs_data, out, "--dataset", "demo_samples")) == 2
    one_line(capsys, "its pairs file")
    assert not out.exists()  # nothing was written


def test_new_samples_rerun_a_dpo_training_in_a_run(tmp_path, demo_dir, calls):  # noqa: F811
    """Pins: in `sqltune run` a --stage dpo training read pairs that `sqltune samples` registered in the run's data
    folder, which prepare's identity does not cover, so after new samples the training was skipped ("done already")
    and its old adapter kept. The identity of a dpo training now holds the content of its records and pairs."""
    from test_pipeline_identity import ran

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"""
name: dpo
stages: [prepare, train]
model_name_or_path: some-base-model
template: chatml
prepare: {{source: spider, data_dir: {demo_dir}, name: demo}}
train: {{stage: dpo, dataset: demo_samples, max_steps: 2}}
""")
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run), "--stages", "prepare"]) == 0
    data = run / "data"
    pair = {"db_id": "x", "instruction": "i", "input": "q", "history": [], "chosen": "SELECT 1", "rejected": "SELECT"}
    (data / "demo_samples_pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (data / "demo_samples.jsonl").write_text("")
    registry = json.loads((data / "dataset_info.json").read_text())
    registry["demo_samples"] = {"file_name": "demo_samples.jsonl", "pairs": "demo_samples_pairs.jsonl",
                                "samples": "demo_samples.meta.json"}
    (data / "dataset_info.json").write_text(json.dumps(registry))
    ran(run, calls)
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert ran(run, calls)["train"] == "ok"
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert ran(run, calls)["train"] == "skipped"
    (data / "demo_samples_pairs.jsonl").write_text(json.dumps({**pair, "rejected": "SELECT 2"}) + "\n")
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert ran(run, calls) == {"prepare": "skipped", "train": "ok"}


def test_dpo_keeps_the_time_budget(tiny_model, pairs_data, tmp_path, monkeypatch, capsys):
    """--max_train_minutes stops a DPO run as it stops SFT (a fake clock: one minute per reading), and says so."""
    import sqltune.train.budget as budget

    now = [0.0]

    def clock():
        now[0] += 60.0
        return now[0]

    monkeypatch.setattr(budget, "_now", clock)
    figures = train(config(tiny_model, pairs_data, tmp_path / "cut", max_steps=6, max_train_minutes=3))
    assert figures["steps"] < figures["planned_steps"] == 6
    assert f"the time budget stopped training at step {figures['steps']} of 6" in capsys.readouterr().err
    assert (tmp_path / "cut" / "adapter_model.safetensors").is_file()


def test_dpo_on_a_cpu_sends_only_answer_positions_through_the_output_layer(tiny_model, pairs_data, tmp_path,
                                                                           monkeypatch):
    """Pins DPO's (and GRPO's) CPU cost: TRL's fused LM head projected every position of prompt and answer through
    the output layer on a CPU, forward and backward (it compacts to the labelled positions only where Triton runs),
    most of it for prompt tokens whose log-probabilities it then zeroes; `run_trainer` makes it project the answers
    alone.
    Before the fix each call saw 4 whole sequences (more rows than the longest 4 answers can have)."""
    import types

    import trl.trainer.utils as trl_utils

    cfg = config(tiny_model, pairs_data, tmp_path / "dpo", max_steps=1)
    tok = load_tokenizer(tiny_model)
    template = get_template("chatml", tok)
    pairs = [json.loads(line) for line in (pairs_data / "demo_samples_pairs.jsonl").read_text().splitlines()]
    encoded = [encode_preference(tok, template, p, cfg.max_source_length, cfg.max_target_length) for p in pairs]
    most_answer_rows = 2 * 2 * max(max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in encoded)
    fewest_sequence_rows = 2 * 2 * min(len(e["prompt_ids"]) for e in encoded)
    assert most_answer_rows < fewest_sequence_rows  # so the check below tells answers from whole sequences

    rows = []
    projection = trl_utils._ChunkedLogProbFunction

    def counted(hidden, *rest):
        rows.append(hidden.shape[0])
        return projection.apply(hidden, *rest)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=counted))
    train(cfg)
    assert len(rows) == 2  # the policy's forward and the reference's, on one batch of 2 pairs
    assert 0 < max(rows) <= most_answer_rows


def test_answer_positions_alone_give_trls_log_probs_and_gradients(tiny_model):
    """The switch changes which rows the output layer sees, not what comes out: the log-probabilities of the labelled
    positions and every gradient equal TRL's own full projection's."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from sqltune.train.loss import trl_head_on_labelled_positions

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    add_fused_lm_head(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    labels = ids.masked_fill(torch.arange(40) < 30, -100)  # a 30-token prompt, a 10-token answer

    def forward_backward():
        model.zero_grad()
        log_probs = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        log_probs.sum().backward()
        return log_probs.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_log_probs, full_grads = forward_backward()
    with trl_head_on_labelled_positions():
        log_probs, grads = forward_backward()
    torch.testing.assert_close(log_probs, full_log_probs)
    assert len(grads) == len(full_grads) > 0
    for grad, full in zip(grads, full_grads):
        torch.testing.assert_close(grad, full)
