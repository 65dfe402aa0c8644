"""`sqltune run` end to end on the tiny model: every stage's outputs, the trace, skipping and continuing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import training_killed_after_save

from sqltune.cli import main
from sqltune.infer.hf_backend import HFGenerator

ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def run_config(tmp_path, demo_dir, tiny_model):
    cfg = tmp_path / "e2e.yaml"
    cfg.write_text(f"""
name: e2e
stages: [prepare, train, merge, predict, evaluate]
compare_base: true
model_name_or_path: {tiny_model}
template: chatml
max_source_length: 512
prepare: {{source: spider, data_dir: {demo_dir}, name: demo}}
train: {{max_steps: 2, per_device_train_batch_size: 4, save_steps: 1, learning_rate: 1.0e-3, plot_loss: true}}
predict: {{max_new_tokens: 8, batch_size: 8}}
evaluate: {{etype: all}}
""")
    return cfg


def spans(run):
    return [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]


def test_run_end_to_end_with_trace(run_config, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["run", str(run_config), "--runs_dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "finetuned" in out and "EX" in out
    (run,) = list(runs.iterdir())
    for rel in ("config.yaml", "data/demo_train.jsonl", "data/demo_dev_gold.sql", "adapter/adapter_model.safetensors",
                "adapter/training_loss.png", "merged/model.safetensors", "predictions/base.sql",
                "predictions/finetuned.sql", "eval/base/metrics.json", "eval/finetuned/report.md",
                "eval/finetuned/per_example.jsonl"):
        assert (run / rel).is_file(), rel
    assert len((run / "predictions" / "finetuned.sql").read_text().splitlines()) == 30
    stages = [s["stage"] for s in spans(run)]
    assert stages == ["prepare", "train", "merge", "predict_base", "evaluate_base", "predict_finetuned",
                      "evaluate_finetuned", "run"]
    assert all(s["status"] == "ok" and s["duration_s"] >= 0 for s in spans(run))
    figures = {s["stage"]: s["figures"] for s in spans(run)}
    assert figures["prepare"]["dev_records"] == 30 and "train_loss" in figures["train"]
    assert "ex" in figures["evaluate_finetuned"] and "ex_finetuned" in figures["run"]

    assert main(["trace", "list", "--runs_dir", str(runs)]) == 0
    listing = capsys.readouterr().out
    assert run.name in listing and "ok" in listing
    assert main(["trace", "show", run.name, "--runs_dir", str(runs), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in shown["spans"]] == stages
    assert main(["trace", "show", run.name, "--runs_dir", str(runs)]) == 0
    assert "evaluate_finetuned" in capsys.readouterr().out

    # the same folder again: every stage is skipped
    assert main(["run", str(run_config), "--run_dir", str(run)]) == 0
    again = spans(run)[len(stages):]
    assert [s["status"] for s in again[:-1]] == ["skipped"] * (len(stages) - 1)


def test_interrupted_run_continues_where_it_stopped(run_config, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    original = HFGenerator.generate
    calls = {"n": 0}

    def fails_in_second_predict(self, prompts):
        calls["n"] += 1
        if calls["n"] == 6:  # base takes 4 batches of 8; die in the fine-tuned model's 2nd batch
            raise RuntimeError("simulated crash")
        return original(self, prompts)

    monkeypatch.setattr(HFGenerator, "generate", fails_in_second_predict)
    assert main(["run", str(run_config), "--runs_dir", str(runs)]) == 1
    monkeypatch.setattr(HFGenerator, "generate", original)
    (run,) = list(runs.iterdir())
    assert spans(run)[-1]["stage"] == "run" and spans(run)[-1]["status"] == "failed"
    assert main(["run", str(run_config), "--runs_dir", str(runs)]) == 0
    assert len(list(runs.iterdir())) == 1  # continued in the same folder
    everything = spans(run)
    first_end = next(i for i, s in enumerate(everything) if s["stage"] == "run")
    second = everything[first_end + 1:]
    status = {s["stage"]: s["status"] for s in second}
    assert status["prepare"] == status["train"] == status["merge"] == status["predict_base"] == "skipped"
    resumed = next(s for s in second if s["stage"] == "predict_finetuned")
    assert resumed["status"] == "ok" and resumed["figures"]["resumed_from"] == 8
    assert len((run / "predictions" / "finetuned.sql").read_text().splitlines()) == 30


def test_bad_run_config(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stages: [prepare, fly]\n")
    assert main(["run", str(cfg)]) == 2
    assert "unknown stage 'fly'" in capsys.readouterr().err
    cfg.write_text("train: {lora_rnak: 8}\n")
    assert main(["run", str(cfg), "--runs_dir", str(tmp_path / "r")]) == 2
    assert "did you mean --lora_rank" in capsys.readouterr().err


def test_shipped_configs_are_valid(tmp_path):
    from pathlib import Path

    from sqltune.pipeline import read_plan, stage_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"demo.yaml", "spider_qwen05.yaml", "spider_7b_lora.yaml"}
    for path in configs:
        plan = read_plan(str(path))
        if not hasattr(plan, "stages"):
            continue  # a `steps:` recipe: tests/test_pipeline_steps.py resolves its steps
        for stage in plan.stages:
            filled = {"evaluate": {"pred": "p", "gold": "g", "db_dir": "d"},
                      "merge": {"adapter": "a"}}.get(stage, {})
            stage_config(plan, stage, tmp_path, **filled)


def test_run_interrupted_in_training_resumes_the_checkpoint(run_config, tmp_path):
    runs = tmp_path / "runs"
    with training_killed_after_save(1):
        assert main(["run", str(run_config), "--runs_dir", str(runs)]) == 1
    (run,) = list(runs.iterdir())
    assert (run / "adapter" / "checkpoint-1").is_dir()
    assert main(["run", str(run_config), "--runs_dir", str(runs)]) == 0
    train_spans = [s for s in spans(run) if s["stage"] == "train"]
    assert [s["status"] for s in train_spans] == ["failed", "ok"] and train_spans[-1]["figures"]["steps"] == 2
    assert main(["run", str(run_config), "--run_dir", str(run)]) == 0  # and the finished run skips it now
    assert [s for s in spans(run) if s["stage"] == "train"][-1]["status"] == "skipped"


def test_changed_settings_rerun_downstream_with_the_real_stages(run_config, tmp_path):
    """Pins the issue's reproduction: after `train.learning_rate` changed, `[predict_finetuned] done already with
    these settings: skipped` printed the old adapter's EX; after a predict setting changed, predict failed with
    "holds predictions of another run ... pass --overwrite". Real stages, tiny model, no merge."""
    run = tmp_path / "run"
    base = ["run", str(run_config), "--run_dir", str(run), "--stages", "prepare,train,predict,evaluate",
            "--compare_base", "false"]

    def statuses():
        last = spans(run)
        start = max((i for i, s in enumerate(last[:-1]) if s["stage"] == "run"), default=-1) + 1
        return {s["stage"]: s["status"] for s in last[start:-1]}

    assert main(base) == 0
    first = (run / "predictions" / "finetuned.sql.meta.json").read_text()
    assert main(base + ["--train.learning_rate", "5e-4"]) == 0
    assert statuses() == {"prepare": "skipped", "train": "ok", "predict_finetuned": "ok", "evaluate_finetuned": "ok"}
    assert main(base + ["--train.learning_rate", "5e-4", "--predict.max_new_tokens", "6"]) == 0
    assert statuses() == {"prepare": "skipped", "train": "skipped", "predict_finetuned": "ok",
                          "evaluate_finetuned": "ok"}
    assert (run / "predictions" / "finetuned.sql.meta.json").read_text() != first
    assert len((run / "predictions" / "finetuned.sql").read_text().splitlines()) == 30


def test_multi_turn_run_keeps_interaction_blocks(tmp_path, demo_dir, tiny_model):
    """CONTRACTS 3: for SParC/CoSQL records predict writes a blank line after each interaction; `sqltune run` must
    hand that file and the prepared records (as `questions`) to evaluate, which scores it against the gold blocks."""
    import shutil

    data = tmp_path / "sparc"
    data.mkdir()
    shutil.copy(demo_dir / "tables.json", data / "tables.json")
    shutil.copytree(demo_dir / "database", data / "database")
    questions = json.loads((demo_dir / "dev.json").read_text())
    first = [q for q in questions if q["db_id"] == questions[0]["db_id"]][:2]
    other = next(q for q in questions if q["db_id"] != questions[0]["db_id"])
    dialog = [{"database_id": first[0]["db_id"],
               "interaction": [{"utterance": q["question"], "query": q["query"]} for q in first]},
              {"database_id": other["db_id"],
               "interaction": [{"utterance": other["question"], "query": other["query"]}]}]
    for split in ("train", "dev"):
        (data / f"{split}.json").write_text(json.dumps(dialog))
    recipe = tmp_path / "mt.yaml"
    recipe.write_text(f"""
name: mt
stages: [prepare, predict, evaluate]
model_name_or_path: {tiny_model}
template: chatml
max_source_length: 256
prepare: {{source: sparc, data_dir: {data}}}
predict: {{max_new_tokens: 8}}
""")
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    text = (run / "predictions" / "base.sql").read_text()
    assert text.count("\n\n") == 2 and text.endswith("\n\n")  # two interactions, each ended by a blank line
    evaluation = [s for s in spans(run) if s["stage"] == "evaluate_base"][-1]
    assert evaluation["status"] == "ok" and evaluation["figures"]["count"] == 3
    rows = [json.loads(line) for line in (run / "eval" / "base" / "per_example.jsonl").read_text().splitlines()]
    assert [r.get("question") for r in rows] == [q["question"] for q in first + [other]]


def test_merge_command_finds_the_recipes_adapter(tmp_path, capsys):
    """Pins: `sqltune merge configs/demo.yaml --print_config` failed with "--adapter is required": a stage command
    given a run recipe finds what the recipe's train wrote (its output_dir, else train's default)."""
    import yaml

    assert main(["merge", str(ROOT_CONFIGS / "demo.yaml"), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["adapter"] == "output/adapter"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ntrain: {output_dir: out/lora}\nmerge: {out: out/merged}\n")
    assert main(["merge", str(recipe), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["adapter"] == "out/lora"
