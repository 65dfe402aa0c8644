"""DPO's or GRPO's step time on a CPU with TRL's output layer over every position against sqltune's, over the answers
only.

TRL 1.16's DPO and GRPO call the model with `fused_lm_head=True`. Where Triton does not run (a CPU), TRL projects every
position, the prompt's included, through the output layer (Qwen's has 152k rows), forward and backward, and then
zeroes the prompt's log-probabilities; sqltune's `trl_head_on_labelled_positions` (sqltune/train/loss.py, opened by
every training stage) makes it project the labelled positions alone, as it does where Triton runs. The same
log-probabilities and gradients (tests/test_dpo.py); this measures what it saves. Arms:

    trl       `sqltune train --stage STAGE` with the switch replaced by a no-op: TRL as a CPU user of TRL runs it
    sqltune   `sqltune train --stage STAGE` as shipped

Each run is its own process: a fresh LoRA (r16, alpha 32, every linear layer) on --model, --steps optimizer steps
with the same seed. --stage dpo: bf16, 2 pairs a batch x 2 accumulated (the DPO step of
configs/spider_qwen05_rft_from_adapter.yaml, and of spider_qwen05_rft.yaml until a0d92fa), the same pairs in the same
order. --stage grpo: configs/demo_grpo.yaml's GRPO (float32, 4 prompts x 4 completions a step from transformers'
generate, 96 tokens at most, temperature 1.0, beta 0, DAPO loss, gradient checkpointing); the completions are
sampled, so the arms' steps see equal prompts, not equal completions. Arms alternate for --repeats rounds, the order
reversed every other round. Printed per run: seconds per step (the Trainer's training-loop time / steps, loading and
saving excluded), peak RSS, the mean training loss (for DPO the arms' should agree: the same computation); then the
best of each arm and sqltune / trl.

    python benchmarks/trl_head.py --dataset_dir RUN/data --dataset right --model qwen2.5-coder-0.5b-instruct
    python benchmarks/trl_head.py --stage grpo --dataset_dir DEMO --dataset demo_train --model SFT_MERGED \
        --max_source_length 512

--stage dpo's --dataset: one `sqltune samples` registered (its pairs), e.g. the `right` of a
configs/spider_qwen05_rft.yaml run's data folder; --stage grpo's: prepared records with databases (the reward runs
the SQL), e.g. demo_train of `sqltune prepare --source demo --name demo --schema_style words`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("trl", "sqltune")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_dir", required=True, help="folder of dataset_info.json holding --dataset")
    p.add_argument("--stage", choices=["dpo", "grpo"], default="dpo")
    p.add_argument("--dataset", default="right", help="dpo: a dataset `sqltune samples` registered (its pairs); "
                   "grpo: prepared records with databases")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="catalog name or model folder")
    p.add_argument("--template", default="chatml")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2, help="alternations of the two arms")
    p.add_argument("--max_source_length", type=int, default=768)
    p.add_argument("--work", default="", help="folder for the runs' outputs (default: a temporary one)")
    p.add_argument("--arm", default="", help=argparse.SUPPRESS)  # set by the parent for its child processes
    a = p.parse_args(argv)
    if a.steps < 1 or a.repeats < 1:
        print("trl_head: --steps and --repeats must be >= 1")
        return 2
    if a.arm:
        return child(a)
    if not (Path(a.dataset_dir) / "dataset_info.json").is_file():
        print(f"trl_head: --dataset_dir {a.dataset_dir} holds no dataset_info.json")
        return 2
    work = Path(a.work or tempfile.mkdtemp(prefix="sqltune-trl-head-"))
    work.mkdir(parents=True, exist_ok=True)
    each = "DPO steps of 2 x 2 pairs, bf16" if a.stage == "dpo" else "GRPO steps of 4 prompts x 4 completions, float32"
    print(f"model {a.model}, dataset {a.dataset} in {a.dataset_dir}, {a.steps} {each} per run, LoRA r16, "
          f"{a.repeats} rounds; CPU ({os.cpu_count()} cores)", flush=True)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(a.repeats):
        for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
            res = run(a, arm, work / f"{arm}_round{r + 1}")
            if res is None:
                return 1
            results[arm].append(res)
            print(f"{arm:<7} round {r + 1}: {res['s_per_step']:6.1f} s/step ({res['steps']} steps in "
                  f"{res['train_runtime_s']:.1f} s), peak RSS {res['peak_rss_mb']:.0f} MB, "
                  f"mean loss {res['train_loss']:.4f}", flush=True)
    best = {arm: min(x["s_per_step"] for x in runs) for arm, runs in results.items()}
    for arm in ARMS:
        print(f"{arm:<7} best: {best[arm]:.1f} s/step; peak RSS {max(x['peak_rss_mb'] for x in results[arm]):.0f} MB")
    print(f"sqltune / trl, best of each: {best['trl'] / best['sqltune']:.2f}x the steps per second")
    return 0


def run(a, arm: str, out: Path) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--stage", a.stage, "--dataset_dir",
           a.dataset_dir, "--dataset", a.dataset, "--model", a.model, "--template", a.template, "--steps", str(a.steps),
           "--max_source_length", str(a.max_source_length), "--work", str(out)]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"trl_head: the {arm} arm failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


def child(a) -> int:
    """One arm: `sqltune.train` (--stage dpo or grpo) in this process; prints RESULT {json}."""
    import sqltune.train.session as session
    from sqltune.config import TrainConfig
    from sqltune.train.dispatch import train

    if a.arm == "trl":  # TRL's own CPU path: every position through the output layer
        session.trl_head_on_labelled_positions = contextlib.nullcontext
    common = dict(stage=a.stage, model_name_or_path=a.model, dataset=a.dataset, dataset_dir=a.dataset_dir,
                  template=a.template, finetuning_type="lora", lora_rank=16, lora_alpha=32, lora_target="all",
                  max_source_length=a.max_source_length, learning_rate=5e-5, max_steps=a.steps, logging_steps=1,
                  save_steps=10_000, output_dir=a.work, overwrite_output_dir=True, quiet=True, seed=42)
    if a.stage == "dpo":  # configs/spider_qwen05_rft_from_adapter.yaml's DPO
        cfg = TrainConfig(**common, bf16=True, max_target_length=128, per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, dpo_beta=0.1)
    else:  # configs/demo_grpo.yaml's GRPO
        cfg = TrainConfig(**common, lora_dropout=0.0, num_generations=4, per_device_train_batch_size=16,
                          max_completion_length=96, grpo_temperature=1.0, rollout_backend="hf",
                          gradient_checkpointing=True)
    figures = train(cfg)
    print("RESULT " + json.dumps({
        "steps": figures["steps"], "train_runtime_s": figures["train_runtime_s"],
        "s_per_step": figures["train_runtime_s"] / max(figures["steps"], 1), "train_loss": figures.get("train_loss"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
