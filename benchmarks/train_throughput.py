"""Training throughput of `sqltune train`'s batching against a plain padded `transformers.Trainer`, in one run.

Both arms train the same LoRA on the same model, records and number of steps. Ours: length-grouped batches padded
to their own longest example (sqltune.train.data). Baseline: every example padded to max_source_length +
max_target_length, random order, default collator — what a plain Trainer script does. Tokens/s counts real
(non-padding) tokens. Each arm runs in its own process so its peak RSS is its own.

    python benchmarks/train_throughput.py [--model smollm2-135m-instruct] [--steps 12] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def arm(kind: str, a) -> dict:
    import resource

    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from sqltune.config import PrepareConfig, TrainConfig
    from sqltune.data.prepare import prepare
    from sqltune.loading import load_model, load_tokenizer, resolve
    from sqltune.templates import get_template
    from sqltune.train.data import Collator, load_records, tokenize_records
    from sqltune.train.setup import setup_trainable

    work = Path(a.work)
    if not (work / "data" / "dataset_info.json").is_file():
        prepare(PrepareConfig(source="demo", out=str(work / "data"), name="demo"))
    path = resolve(a.model)
    tok = load_tokenizer(path)
    template = get_template(a.template, tok)
    records = load_records(str(work / "data"), "demo_train", a.steps * a.batch)
    dataset, _ = tokenize_records(records, tok, template, a.max_source_length, a.max_target_length)
    real_tokens = sum(dataset["length"])
    torch.manual_seed(0)
    cfg = TrainConfig(model_name_or_path=str(path), lora_rank=16, lora_alpha=32, lora_target="all")
    model = setup_trainable(load_model(path), cfg)
    common = dict(output_dir=str(work / kind), per_device_train_batch_size=a.batch, max_steps=a.steps,
                  learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True,
                  remove_unused_columns=False, disable_tqdm=True, seed=0)
    if kind == "ours":
        args = TrainingArguments(train_sampling_strategy="group_by_length", length_column_name="length", **common)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=Collator(tok.pad_token_id))
    else:
        width = a.max_source_length + a.max_target_length
        pad = tok.pad_token_id

        def pad_row(row):
            n = len(row["input_ids"])
            return {"input_ids": row["input_ids"] + [pad] * (width - n), "labels": row["labels"] + [-100] * (width - n),
                    "attention_mask": [1] * n + [0] * (width - n)}
        padded = dataset.map(pad_row, remove_columns=["length"])
        args = TrainingArguments(**common)
        trainer = Trainer(model=model, args=args, train_dataset=padded, data_collator=default_data_collator)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"arm": kind, "seconds": elapsed, "real_tokens": real_tokens, "tokens_per_s": real_tokens / elapsed,
            "peak_rss_mb": round(peak_mb)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--template", default="chatml")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max_source_length", type=int, default=512)
    p.add_argument("--max_target_length", type=int, default=96)
    p.add_argument("--work", default="")
    p.add_argument("--arm", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        print("RESULT " + json.dumps(arm(a.arm, a)))
        return 0
    work = a.work or tempfile.mkdtemp(prefix="sqltune-train-bench-")
    results = {}
    for kind in ("baseline", "ours"):
        cmd = [sys.executable, __file__, "--arm", kind, "--work", work] + [
            x for k in ("model", "template", "steps", "batch", "max_source_length", "max_target_length")
            for x in (f"--{k}", str(getattr(a, k)))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-3000:])
            return 1
        results[kind] = json.loads(line[7:])
    b, o = results["baseline"], results["ours"]
    print(f"model {a.model}, {a.steps} steps x batch {a.batch}, {o['real_tokens']} real tokens per arm")
    print(f"plain padded Trainer: {b['tokens_per_s']:.1f} tokens/s, {b['seconds']:.1f} s, peak RSS {b['peak_rss_mb']} MB")
    print(f"sqltune (length-grouped, dynamic padding): {o['tokens_per_s']:.1f} tokens/s, {o['seconds']:.1f} s, "
          f"peak RSS {o['peak_rss_mb']} MB")
    print(f"speed-up: {o['tokens_per_s'] / b['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
