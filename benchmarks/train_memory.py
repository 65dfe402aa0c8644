"""Host memory over a CPU training run, the freed heap kept (glibc's default, sqltune's default) and handed back every
--trim_every steps (`train --trim_host_memory_every`): peak resident memory, resident memory at each logged step
(trainer_log.jsonl's rss_mb) and seconds per step.

Each arm is `sqltune train` for --steps steps in a process of its own under /usr/bin/time -v (LoRA r16 on every
linear layer, --bf16, batch --batch, one database's schema shared within a batch: the Spider recipe's training).
Arms alternate over --rounds rounds. It trains a real model for minutes per arm: run it on a quiet machine.

    python benchmarks/train_memory.py --data DIR --dataset spider_train --model qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("kept", "handed_back")


def train_command(a, arm: str, out: Path) -> list[str]:
    flags = ["train", "--model_name_or_path", a.model, "--dataset", a.dataset, "--dataset_dir", a.data,
             "--template", a.template, "--max_source_length", str(a.max_source_length), "--max_target_length",
             str(a.max_target_length), "--per_device_train_batch_size", str(a.batch), "--max_steps", str(a.steps),
             "--bf16", "--lora_rank", "16", "--lora_alpha", "32", "--lora_target", "all", "--logging_steps",
             str(a.logging_steps), "--save_steps", str(10 * a.steps), "--output_dir", str(out),
             "--overwrite_output_dir", "--quiet"]
    if arm == "handed_back":
        flags += ["--trim_host_memory_every", str(a.trim_every)]
    return ["/usr/bin/time", "-v", sys.executable, "-m", "sqltune", *flags]


def run_arm(a, arm: str, out: Path) -> dict:
    """Peak RSS (MB), RSS at each logged step and seconds per step of one arm's run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(train_command(a, arm, out), capture_output=True, text=True, env=env)
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"train_memory: the {arm} run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "rss_mb" in r]
    return {"peak_mb": int(found.group(1)) / 1024, "rss_by_step": {r["step"]: r["rss_mb"] for r in steps},
            "s_per_step": rows[-1]["train_runtime"] / a.steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder holding dataset_info.json")
    p.add_argument("--dataset", default="spider_train")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--template", default="chatml")
    p.add_argument("--max_source_length", type=int, default=768)
    p.add_argument("--max_target_length", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--trim_every", type=int, default=1, help="the handed_back arm's --trim_host_memory_every")
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sqltune-train-memory-"))
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(a.rounds):
        for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
            f = run_arm(a, arm, work / f"{arm}{r}")
            results[arm].append(f)
            by_step = ", ".join(f"{s}: {v:.0f}" for s, v in f["rss_by_step"].items())
            print(f"round {r + 1} {arm}: peak RSS {f['peak_mb']:.0f} MB, {f['s_per_step']:.2f} s/step; "
                  f"RSS MB by step {by_step}", flush=True)
    peak = {arm: max(f["peak_mb"] for f in fs) for arm, fs in results.items()}
    speed = {arm: sum(f["s_per_step"] for f in fs) / len(fs) for arm, fs in results.items()}
    print(f"handed back against kept: peak RSS {peak['handed_back'] / peak['kept']:.2f}x "
          f"({peak['handed_back']:.0f} against {peak['kept']:.0f} MB), seconds per step "
          f"{speed['handed_back'] / speed['kept']:.2f}x ({a.steps} steps, batch {a.batch}, trimmed every {a.trim_every}, "
          f"{a.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
