"""The benchmark scripts' code paths, on the tiny model and the demo data (the real runs are in BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from test_dpo import pairs_data  # noqa: E402, F401 (fixture: demo pairs registered by `sqltune samples`)


def test_spider_dev_benchmark_code_path(demo_dir, tiny_model, tmp_path):
    import spider_dev

    out = tmp_path / "bench"
    assert spider_dev.main(["--spider", str(demo_dir), "--model", str(tiny_model), "--dev_sample", "12",
                            "--train_examples", "16", "--train_minutes", "1", "--max_new_tokens", "6",
                            "--num_samples", "0", "--out", str(out)]) == 0  # greedy arms; votes: test_spider_dev_bench
    results = json.loads((out / "results.json").read_text())
    assert results["dev_questions"] == 12 and results["train_examples"] == 16
    assert set(results["results"]) == {"base", "finetuned"}
    assert results["results"]["finetuned"]["table"]["all"]["count"] == 12
    for stage in ("prepare", "predict_base", "train", "merge", "predict_finetuned", "evaluate_finetuned"):
        assert results["stages"][stage]["wall_s"] >= 0
    assert "| all | 12 |" in (out / "section.md").read_text()
    assert len((out / "dev_questions.txt").read_text().split()) == 12


def test_train_throughput_arms_code_path(tiny_model, prepared_demo, tmp_path, capsys):
    """Every arm (plain Trainer + DataCollatorForSeq2Seq, sqltune default, with and without the shared prompt,
    --packing, --bf16) trains the same real tokens; the summary's last line is the headline speed-up; one arm also runs through its own process."""
    import train_throughput as tt

    common = ["--model", str(tiny_model), "--data", str(prepared_demo), "--dataset", "demo_train", "--steps", "3",
              "--batch", "2", "--max_source_length", "96", "--max_target_length", "32", "--work", str(tmp_path)]
    runs = {}
    for arm in tt.arms_for("cpu"):
        assert tt.main(common + ["--arm", arm]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][-1]
        runs[arm] = [json.loads(line[len("RESULT "):])]
    assert set(runs) == {"baseline", "default", "unshared", "packing", "bf16", "bf16_unshared"}
    assert len({r[0]["real_tokens"] for r in runs.values()}) == 1
    assert all(r[0]["tokens_per_s"] > 0 for r in runs.values())
    assert runs["baseline"][0]["steps"] == 3 and all(r[0]["steps"] >= 3 for r in runs.values())  # one epoch each
    assert abs(runs["default"][0]["loss"] - runs["baseline"][0]["loss"]) < 0.02 * runs["baseline"][0]["loss"]
    lines = tt.summary(runs)
    assert lines[-1].startswith("speed-up over a plain Trainer (DataCollatorForSeq2Seq): ") and lines[-1].endswith("x")
    args = tt.main.__globals__["argparse"].Namespace(
        device="cpu", model=str(tiny_model), template="chatml", steps=2, batch=2, max_source_length=96,
        max_target_length=32, work=str(tmp_path), data=str(prepared_demo), dataset="demo_train")
    assert tt.spawn(args, "default", 1)["real_tokens"] > 0


def test_train_throughput_grouped_records_are_an_epochs_first_batches(prepared_demo, tmp_path):
    """--records grouped registers the first steps x batch records of sqltune's epoch over the whole split: whole
    batches of one database where the split allows, in the order the sampler drew them."""
    import shutil

    import train_throughput as tt
    from sqltune.train.data import load_records
    from sqltune.train.shared_prefix import prefix_key

    data = tmp_path / "data"
    shutil.copytree(prepared_demo, data)
    name = tt.grouped_records(str(data), "demo_train", steps=3, batch=2)
    chosen = load_records(str(data), name)
    assert name == "demo_train_grouped3x2" and len(chosen) == 6
    assert all(prefix_key(chosen[i]) == prefix_key(chosen[i + 1]) for i in (0, 2, 4))
    assert all(r in load_records(str(data), "demo_train") for r in chosen)


def test_eval_speed_code_path(demo_dir, prepared_demo, capsys):
    """Warm-up, alternating rounds and the median, on the demo data (gold against itself: identical figures)."""
    import eval_speed

    gold = prepared_demo / "demo_dev_gold.sql"
    assert eval_speed.main(["--pred", str(gold), "--gold", str(gold), "--db_dir", str(demo_dir / "database"),
                            "--tables", str(demo_dir / "tables.json"), "--workers", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "figures identical: True" in out and out.strip().splitlines()[-1].startswith("speed-up: ")


def test_predict_throughput_code_path(tiny_model, tmp_path, capsys):
    """float32 and bfloat16 at several batch sizes; batched answers compared with batch 1's."""
    import predict_throughput

    assert predict_throughput.main(["--device", "cpu", "--model", str(tiny_model), "--prompts", "4", "--batches",
                                    "1,4", "--max_new_tokens", "4", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "float32   batch   1" in out and "bfloat16  batch   4" in out and "batch   4: bfloat16 / float32 =" in out


def test_predict_throughput_vote_arms_code_path(tiny_model, tmp_path, capsys):
    """--vote N times the vote's sampling with the prompt read once against read once per sample."""
    import predict_throughput

    assert predict_throughput.main(["--device", "cpu", "--model", str(tiny_model), "--prompts", "3", "--vote", "3",
                                    "--max_new_tokens", "4", "--work", str(tmp_path), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "identical in both arms (same seed): 3/3" in out
    assert out.strip().splitlines()[-1].startswith("vote@3 sampling, shared prompt over repeated prompt")


def test_predict_throughput_bad_options_are_one_line(tmp_path, capsys):
    """A missing --records file or --vote 1 is one line and exit 2, before any model is loaded."""
    import predict_throughput

    assert predict_throughput.main(["--records", str(tmp_path / "none.jsonl")]) == 2
    assert predict_throughput.main(["--vote", "1"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [f"predict_throughput: --records {tmp_path / 'none.jsonl'} not found (a prepared JSONL, e.g. "
                   "data/spider_dev.jsonl)", "predict_throughput: --vote must be 0 (greedy arms) or at least 2"]


def test_predict_throughput_backend_arms_hf_only(tiny_model, tmp_path, capsys):
    """--backend hf,vllm without vLLM for the given Python: the vLLM arm is skipped with its reason, the HF arm runs
    in its own process (greedy and vote@2), two rounds, and the summary names its figures."""
    import importlib.util

    import predict_throughput

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: this test is the path without it")
    assert predict_throughput.main(["--backend", "hf,vllm", "--model", str(tiny_model), "--prompts", "3",
                                    "--vote", "2", "--vote_prompts", "2", "--batch_size", "2", "--max_new_tokens",
                                    "4", "--repeats", "2", "--work", str(tmp_path), "--hf_python", sys.executable,
                                    "--vllm_python", sys.executable]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("vllm arm skipped: vLLM is not installed for ")
    rounds = [x for x in out if x.startswith("hf   round ")]
    assert len(rounds) == 2 and all("greedy " in x and "vote@2 " in x for x in rounds)
    assert "prompt token ids identical in every run: True" in out[-2]
    assert out[-1].startswith("hf   best: start ")
    assert "greedy answers equal in its first and last round: 3/3" in out[-1]
    assert predict_throughput.main(["--backend", "hf,tgi"]) == 2
    assert predict_throughput.main(["--backend", "vllm_auto,vllm", "--prompts", "1", "--work", str(tmp_path),
                                    "--vllm_python", sys.executable]) == 2  # both vLLM arms skipped: none can run
    out = capsys.readouterr().out.splitlines()
    assert out[-3].startswith("vllm_auto arm skipped: vLLM is not installed") and out[-1] == \
        "predict_throughput: no arm can run"


def test_ask_latency_without_spider_is_one_line(tmp_path, capsys):
    """Pins: ask_latency run where ../shared/spider is not beside the checkout (a git worktree, say) died in a
    FileNotFoundError traceback; it is one line and exit 2 now, before any model is fetched."""
    import ask_latency

    assert ask_latency.main(["--spider", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().out == (f"ask_latency: --spider {tmp_path / 'nowhere'} has no dev.json "
                                       "(a Spider folder: dev.json and database/)\n")


def test_grpo_rewards_summarises_a_log_by_epoch(tmp_path, capsys):
    """grpo_rewards reads a GRPO trainer_log.jsonl: one row per step with a reward (the run's summary row, which has
    none, left out), the mean reward per epoch and per half; a missing, reward-less or malformed log is one line,
    exit 2 (a malformed line was a JSONDecodeError traceback at first)."""
    import grpo_rewards

    log = tmp_path / "trainer_log.jsonl"
    rows = [{"step": s, "epoch": s / 2, "reward": r, "reward_std": 0.5, "frac_reward_zero_std": 0.25,
             "sql/match": r, "sql/runs": 0.0, "sql/fails": 1 - r, "step_time": 40.0}
            for s, r in ((1, 0.2), (2, 0.4), (3, 0.6), (4, 0.8))] + [{"step": 4, "train_runtime": 160.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert grpo_rewards.main([str(log)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 4 + 2 + 2
    assert out[5:] == ["epoch 1: steps   2  mean reward 0.300", "epoch 2: steps   2  mean reward 0.700",
                       "steps 1-2 / 3-4: mean reward 0.300 / 0.700",
                       "groups whose completions scored alike, mean over steps: 0.25"]
    assert grpo_rewards.main([str(tmp_path / "none.jsonl")]) == 2
    log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert grpo_rewards.main([str(log)]) == 2
    log.write_text('{"step": 1, "reward": 0.5\n')  # a line cut short (a run killed while writing)
    assert grpo_rewards.main([str(log)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err


def test_compare_arms_counts_changes_both_ways(tmp_path, capsys):
    """compare_arms pairs two evaluations' per_example.jsonl by question: changed answers, newly right, newly wrong;
    evaluations of different questions, or a missing folder, are one line and exit 2."""
    import compare_arms

    def write(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "per_example.jsonl").write_text(
            "".join(json.dumps({"question": q, "pred": p, "ex": ex}) + "\n" for q, p, ex in rows))

    write("a", [("q1", "s1", 1), ("q2", "s2", 0), ("q3", "s3", 1), ("q4", "s4", 0)])
    write("b", [("q1", "s1", 1), ("q2", "t2", 1), ("q3", "t3", 0), ("q4", "t4", 0)])
    assert compare_arms.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == ("a -> b: EX 0.500 -> 0.500 on 4 questions; answers changed 3, newly right 1, "
                                       "newly wrong 1\n")
    write("c", [("other", "s1", 1)])
    assert compare_arms.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert compare_arms.main([str(tmp_path / "a"), str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err, err


def test_trl_head_arms_code_path(tiny_model, pairs_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Both arms of benchmarks/trl_head.py train DPO steps on the same pairs (each as the parent's child process
    does, here in this process) and agree on the loss: the trl arm (the switch off, every position through the
    output layer) computes what sqltune's does."""
    import trl_head

    import sqltune.train.session as session

    monkeypatch.setattr(session, "trl_head_on_labelled_positions", session.trl_head_on_labelled_positions)
    results = {}
    for arm in ("sqltune", "trl"):
        assert trl_head.main(["--arm", arm, "--dataset_dir", str(pairs_data), "--dataset", "demo_samples",
                              "--model", str(tiny_model), "--steps", "2", "--work", str(tmp_path / arm)]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][-1]
        results[arm] = json.loads(line[len("RESULT "):])
    assert all(r["steps"] == 2 and r["s_per_step"] > 0 for r in results.values())
    assert results["trl"]["train_loss"] == pytest.approx(results["sqltune"]["train_loss"], rel=1e-2)
    assert trl_head.main(["--dataset_dir", str(tmp_path / "nothing"), "--steps", "1"]) == 2
    assert "holds no dataset_info.json" in capsys.readouterr().out


def test_trl_head_grpo_arm_code_path(tiny_model, prepared_demo, tmp_path, capsys):
    """benchmarks/trl_head.py --stage grpo: one GRPO step of the demo recipe's settings on the demo records."""
    import trl_head

    assert trl_head.main(["--arm", "sqltune", "--stage", "grpo", "--dataset_dir", str(prepared_demo), "--dataset",
                          "demo_train", "--model", str(tiny_model), "--steps", "1", "--max_source_length", "256",
                          "--work", str(tmp_path / "grpo")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][-1]
    assert json.loads(line[len("RESULT "):])["steps"] == 1


def test_batch_plan_counts_both_samplers(tiny_model, prepared_demo, capsys):
    """benchmarks/batch_plan.py: the table of both samplers over the demo train split (counts only; --peak, which
    trains, runs in BENCHMARKS.md's command)."""
    import batch_plan

    assert batch_plan.main(["--data", str(prepared_demo), "--dataset", "demo_train", "--model", str(tiny_model),
                            "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "| fixed |" in out and "| own_remainders |" in out and "of before; largest batch" in out


@pytest.mark.skipif(not Path("/usr/bin/time").is_file(), reason="train_memory reads peaks from /usr/bin/time -v")
def test_train_memory_runs_both_arms(tiny_model, prepared_demo, capsys):
    """benchmarks/train_memory.py: both arms train (`handed_back` with --trim_host_memory_every) and log RSS."""
    import train_memory

    assert train_memory.main(["--data", str(prepared_demo), "--dataset", "demo_train", "--model", str(tiny_model),
                              "--batch", "2", "--steps", "2", "--logging_steps", "1", "--max_source_length", "256"]) == 0
    out = capsys.readouterr().out
    assert "round 1 kept: peak RSS" in out and "round 1 handed_back: peak RSS" in out and "RSS MB by step 1:" in out
    assert "handed back against kept: peak RSS" in out
