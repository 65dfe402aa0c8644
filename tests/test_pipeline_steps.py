"""`sqltune run` with a recipe of named steps (sqltune/pipeline/steps.py) on the tiny model: SFT -> sampled predict on
the train split -> samples -> DPO from the SFT adapter -> greedy and vote predictions -> an evaluation each; every step
one span and one identity, the run's page shows both trainings and both arms; bad steps are one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sqltune.samples as samples_module
from sqltune.cli import main
from sqltune.samples import FAILS, RIGHT, RUNS

ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = ["prepare", "sft", "sample", "right", "dpo", "greedy", "vote", "eval_greedy", "eval_vote"]


@pytest.fixture
def steps_recipe(tmp_path, demo_dir, tiny_model):
    cfg = tmp_path / "rft.yaml"
    cfg.write_text(f"""
name: rft
model_name_or_path: {tiny_model}
template: chatml
max_source_length: 512
steps:
  - {{name: prepare, stage: prepare, settings: {{source: spider, data_dir: {demo_dir}, name: demo}}}}
  - name: sft
    stage: train
    settings: {{max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-3, save_steps: 1, plot_loss: true}}
  - name: sample
    stage: predict
    from: sft
    settings: {{dataset: demo_train, max_samples: 6, num_samples: 2, vote: execution, max_new_tokens: 8}}
  - {{name: right, stage: samples, from: sample, settings: {{workers: 1}}}}
  - name: dpo
    stage: train
    from: sft
    data: right
    settings: {{stage: dpo, max_steps: 2, per_device_train_batch_size: 2, learning_rate: 1.0e-3, lora_dropout: 0.0,
               save_steps: 1}}
  - {{name: greedy, stage: predict, from: dpo, settings: {{max_samples: 6, max_new_tokens: 8}}}}
  - name: vote
    stage: predict
    from: dpo
    settings: {{max_samples: 6, max_new_tokens: 8, num_samples: 2, vote: execution}}
  - {{name: eval_greedy, stage: evaluate, from: greedy}}
  - {{name: eval_vote, stage: evaluate, from: vote}}
""")
    return cfg


@pytest.fixture
def right_samples(monkeypatch):
    """A stand-in for a model that samples right answers: the random tiny model never writes SQL, so each question's
    candidates become three distinct queries scored right, wrong (runs) and failing; the rest of `samples` (records,
    pairs, registry) is the real one."""
    monkeypatch.setattr(samples_module, "candidate_sqls",
                        lambda row: ["SELECT 1", "SELECT 2", "SELECT nothing FROM nowhere"])

    def scored(entry, records, distinct, workers, quiet):
        return [[RIGHT, RUNS, FAILS][:len(d)] for d in distinct], set()

    monkeypatch.setattr(samples_module, "score_candidates", scored)


def spans(run):
    return [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]


def test_steps_run_end_to_end_rerun_skips_and_a_change_reruns_what_follows(steps_recipe, tmp_path, right_samples,
                                                                             capsys):
    runs = tmp_path / "runs"
    assert main(["run", str(steps_recipe), "--runs_dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "eval_greedy" in out and "eval_vote" in out  # the EX table names each evaluate step
    (run,) = list(runs.iterdir())
    for rel in ("sft/adapter_model.safetensors", "predictions/sample.sql.raw.jsonl", "data/right.jsonl",
                "data/right_pairs.jsonl", "dpo/adapter_model.safetensors", "predictions/greedy.sql",
                "predictions/vote.sql", "eval/eval_greedy/metrics.json", "eval/eval_vote/metrics.json",
                "report.html", "config.yaml"):
        assert (run / rel).is_file(), rel
    first = spans(run)
    assert [s["stage"] for s in first] == STEPS + ["run"]
    assert all(s["status"] == "ok" for s in first)
    figures = {s["stage"]: s["figures"] for s in first}
    assert figures["right"]["pairs"] == 6 * 2 and figures["right"]["records"] >= 1
    assert "ex_eval_greedy" in figures["run"] and "ex_eval_vote" in figures["run"]
    dpo_cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())["dpo"]
    assert dpo_cfg["adapter"] == str(run / "sft") and dpo_cfg["dataset"] == "right" and dpo_cfg["stage"] == "dpo"
    page = (run / "report.html").read_text()
    for shown in ("sft training loss", "dpo training loss", "eval_greedy (greedy)",
                  "eval_vote (execution vote over 2 samples + greedy)"):
        assert shown in page, shown

    # the same recipe again: every step is skipped
    assert main(["run", str(steps_recipe), "--run_dir", str(run)]) == 0
    again = spans(run)[len(first):]
    assert [(s["stage"], s["status"]) for s in again[:-1]] == [(s, "skipped") for s in STEPS]

    # one step's setting changed: it and what reads it rerun, nothing else
    seen = len(spans(run))
    assert main(["run", str(steps_recipe), "--run_dir", str(run), "--greedy.max_new_tokens", "6"]) == 0
    status = {s["stage"]: s["status"] for s in spans(run)[seen:-1]}
    assert {k for k, v in status.items() if v == "ok"} == {"greedy", "eval_greedy"}, status
    assert all(v == "skipped" for k, v in status.items() if k not in ("greedy", "eval_greedy"))

    # an early step changed: every step that reads it, directly or not, reruns; prepare does not
    seen = len(spans(run))
    assert main(["run", str(steps_recipe), "--run_dir", str(run), "--greedy.max_new_tokens", "6",
                 "--sft.learning_rate", "2.0e-3"]) == 0
    status = {s["stage"]: s["status"] for s in spans(run)[seen:-1]}
    assert status == {"prepare": "skipped", **{s: "ok" for s in STEPS[1:]}}, status


BAD = [
    ("steps: []\n", "`steps` must be a list of steps"),
    ("steps:\n  - {name: sft, stage: train}\n", "the first step must be the one `prepare` step"),
    ("steps:\n  - {name: p, stage: prepare}\n  - {name: e, stage: evaluate, from: nope}\n",
     "step 'e': `from: nope` names no earlier step (earlier: p)"),
    ("steps:\n  - {name: p, stage: prepare}\n  - {name: e, stage: evaluate, from: p}\n",
     "step 'e': a evaluate step reads from a predict step, not 'p' (prepare)"),
    ("steps:\n  - {name: p, stage: prepare}\n  - {name: s, stage: samples}\n",
     "step 's': a samples step needs `from:` naming the predict step it reads"),
    ("steps:\n  - {name: p, stage: prepare}\n  - {name: t, stage: train, data: p}\n",
     "step 't': `data: p` names no earlier samples step"),
    ("steps:\n  - {name: p, stage: prepare}\n  - {name: p, stage: predict}\n", "step 'p' is named twice"),
    ("steps:\n  - {name: a.b, stage: prepare}\n", "`name` must be a plain name (letters, digits, _, -)"),
    ("steps:\n  - {name: p, stage: prepare}\n  - {name: x, stage: fly}\n", "step 'x': unknown stage 'fly'"),
    ("steps:\n  - {name: p, stage: prepare, settings: {lora_rnak: 8}}\n", "step 'p' (prepare)"),
    ("steps:\n  - {name: p, stage: prepare, max_steps: 2}\n", "unknown key 'max_steps'"),
    ("stages: [prepare]\nsteps:\n  - {name: p, stage: prepare}\n", "`stages` is for a `stages:` recipe"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_steps_are_one_line(tmp_path, capsys, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert main(["run", str(recipe), "--runs_dir", str(tmp_path / "runs"), "--print_config"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_an_unknown_step_in_an_option_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - {name: p, stage: prepare}\n")
    assert main(["run", str(recipe), "--print_config", "--q.max_steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown step 'q' in --q.max_steps (steps: p)" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["spider_qwen05_rft.yaml", "demo_grpo.yaml", "demo_grpo_mixed.yaml", "demo_rft.yaml",
                                  "spider_qwen15_grpo_vllm.yaml"])
def test_shipped_steps_recipes_resolve_every_step(name, tmp_path, capsys):
    """Each step's settings of the issue-28 recipes build into the stage's config (its checks pass) without running
    anything: `sqltune run RECIPE --print_config` (the GPU recipe's vLLM settings are checked here, on the CPU)."""
    import yaml

    assert main(["run", str(ROOT_CONFIGS / name), "--runs_dir", str(tmp_path / "runs"), "--print_config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["steps"] and all(s["name"] in resolved for s in resolved["steps"])
    assert not (tmp_path / "runs").exists()


def test_a_run_restores_the_trace_variable_its_caller_had_set(tmp_path, demo_dir, monkeypatch, capsys):
    """Pins that `sqltune run` puts SQLTUNE_TRACE back as it found it: a caller that had set it (a script tracing its
    own commands) kept nothing of it after a run, which removed the variable instead of restoring it. Within the run
    the steps' spans still land in the run's own trace."""
    import os

    from sqltune.trace import ENV_TRACE

    outer = tmp_path / "outer" / "trace.jsonl"
    monkeypatch.setenv(ENV_TRACE, str(outer))
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"steps:\n  - {{name: p, stage: prepare, settings: {{source: spider, data_dir: {demo_dir}, "
                      f"name: demo}}}}\n")
    assert main(["run", str(recipe), "--run_dir", str(tmp_path / "run")]) == 0
    assert os.environ.get(ENV_TRACE) == str(outer)
    assert [s["stage"] for s in spans(tmp_path / "run")] == ["p", "run"] and not outer.exists()
