"""What training's batches put through the model in one epoch, before and after a database's remainder became a
batch of its own (sqltune/train/shared_prefix.py): counts, not timings, so it runs beside anything.

For the records sqltune trains on (tokenised as training tokenises them), per sampler: batches per epoch, those of
one database (their schema run once), pooled batches of several databases (every row whole), tokens through the
model per epoch (a shared batch counts its prefix once) and the largest batch in tokens (not its memory: a shared
batch needs more per token than a whole one, --peak measures it). `fixed` is the sampler before (every batch `--batch` examples, the
leftovers of all databases pooled); `own_remainders` the one a single-process run now uses.

With --peak (timings aside, this one measures memory): each sampler's largest batch in tokens is trained on for one
step by `sqltune train` (LoRA r16 on every linear layer, --bf16, as configs/spider_qwen05.yaml) in a process of its
own, under /usr/bin/time -v; its maximum resident set is printed, arms alternated for --rounds rounds.

    python benchmarks/batch_plan.py --data DIR --dataset spider_train --model qwen2.5-coder-0.5b-instruct [--peak]
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
sys.path.insert(0, str(ROOT))


def plan_figures(sampler) -> dict:
    """Counts of one epoch of `sampler` (a PrefixGroupedSampler)."""
    batches = sampler.batches()
    tokens = [sampler.tokens_run(b) for b in batches]
    pooled = [(b, t) for b, t in zip(batches, tokens) if len({sampler.groups[i] for i in b}) > 1]
    return {"batches": len(batches), "one_database": sampler.shared_batches(), "pooled": len(pooled),
            "examples_in_pooled": sum(len(b) for b, _ in pooled), "tokens_run": sum(tokens),
            "largest_batch_tokens": max(tokens), "largest_pooled_tokens": max((t for _, t in pooled), default=0)}


def one_step_peak_mb(a, records: list[str], work: Path, label: str) -> float:
    """Peak RSS (MB) of `sqltune train` taking one step on `records` (JSONL lines) as one batch."""
    from sqltune.data.registry import register

    data = work / label
    data.mkdir(parents=True, exist_ok=True)
    (data / "batch.jsonl").write_text("".join(line + "\n" for line in records))
    register(data, "batch", {"file_name": data / "batch.jsonl", "records": len(records)})
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "sqltune", "train", "--model_name_or_path", a.model,
           "--dataset", "batch", "--dataset_dir", str(data), "--template", a.template, "--max_source_length",
           str(a.max_source_length), "--max_target_length", str(a.max_target_length), "--per_device_train_batch_size",
           str(len(records)), "--max_steps", "1", "--bf16", "--lora_rank", "16", "--lora_alpha", "32",
           "--lora_target", "all", "--output_dir", str(work / f"{label}_out"), "--overwrite_output_dir", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"batch_plan: the {label} step failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(found.group(1)) / 1024


def main(argv: list[str] | None = None) -> int:
    from sqltune.loading import load_tokenizer, resolve
    from sqltune.templates import get_template
    from sqltune.train.data import load_records, tokenize_records
    from sqltune.train.shared_prefix import PrefixGroupedSampler, group_prefix_lengths, prefix_key

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder holding dataset_info.json")
    p.add_argument("--dataset", default="spider_train")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="its tokenizer")
    p.add_argument("--template", default="chatml")
    p.add_argument("--max_source_length", type=int, default=768)
    p.add_argument("--max_target_length", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--peak", action="store_true", help="also train one step on each sampler's largest batch")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)

    tok = load_tokenizer(resolve(a.model))
    records = load_records(a.data, a.dataset)
    dataset, _ = tokenize_records(records, tok, get_template(a.template, tok), a.max_source_length,
                                  a.max_target_length)
    groups, lengths = [prefix_key(r) for r in records], list(dataset["length"])
    common = group_prefix_lengths(groups, list(dataset["input_ids"]))
    print(f"{a.dataset}: {len(records)} records, {len(set(groups))} prompt groups, batch {a.batch}, seed {a.seed}")
    rows = {"fixed": PrefixGroupedSampler(groups, lengths, a.batch, a.seed, prefix_lengths=common),
            "own_remainders": PrefixGroupedSampler(groups, lengths, a.batch, a.seed, own_remainders=True,
                                                   prefix_lengths=common)}
    figures = {name: plan_figures(sampler) for name, sampler in rows.items()}
    keys = list(figures["fixed"])
    print("| sampler | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, f in figures.items():
        print(f"| {name} | " + " | ".join(str(f[k]) for k in keys) + " |")
    before, after = figures["fixed"], figures["own_remainders"]
    print(f"tokens through the model per epoch: {after['tokens_run'] / before['tokens_run']:.3f} of before; "
          f"largest batch {after['largest_batch_tokens']} tokens against {before['largest_batch_tokens']}")
    if a.peak:
        from sqltune.data.registry import lookup
        from sqltune.eval.files import read_lines

        lines = read_lines(lookup(a.data, a.dataset)["file_name"], "records")
        largest = {name: max(s.batches(), key=s.tokens_run) for name, s in rows.items()}
        work = Path(tempfile.mkdtemp(prefix="sqltune-batch-plan-"))
        peaks: dict[str, list[float]] = {name: [] for name in rows}
        for r in range(a.rounds):
            for name in (list(rows) if r % 2 == 0 else list(rows)[::-1]):
                batch = largest[name]
                peak = one_step_peak_mb(a, [lines[i] for i in batch], work, f"{name}{r}")
                peaks[name].append(peak)
                print(f"round {r + 1} {name}: one step on its largest batch ({len(batch)} examples, "
                      f"{rows[name].tokens_run(batch)} tokens run): peak RSS {peak:.0f} MB", flush=True)
        print(json.dumps({name: round(max(v)) for name, v in peaks.items()}) + "  (peak RSS MB, highest round)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
