"""Spider dev, base vs LoRA-fine-tuned, with one command (issue: proof on the real benchmark).

    python benchmarks/spider_dev.py [--spider ../shared/spider] [--model qwen2.5-coder-0.5b-instruct]
                                    [--dev_sample 300] [--train_examples 720] [--train_minutes 60] [--out DIR]

1. prepare Spider with the default prompt (schema in words);
2. pick a fixed, seeded sample of dev questions whose database exists (the same for both models) and a seeded
   sample of train records;
3. zero-shot: predict with the base model (greedy, batched), evaluate (EX, EM per hardness, and --plug_value);
4. LoRA fine-tune on the train sample within the time budget, merge, predict, evaluate the same way;
5. write results.json and section.md (both tables side by side, the command, the questions used, wall time per
   stage, training and generation tokens/s, peak memory per stage) into --out.

Each stage runs as its own `sqltune` process so its wall time and peak memory (VmHWM) are its own.
With `--dev_sample 0` every dev question whose database exists is used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(label: str, args: list[str], log: dict, env: dict) -> dict:
    """Run `python -m sqltune ARGS`, recording wall time and peak resident memory."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sqltune", *args], env=env)
    peak = [0]

    def watch():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = proc.wait()
    watcher.join()
    if code != 0:
        raise SystemExit(f"spider_dev: stage {label} failed (exit {code})")
    log[label] = {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak[0] / 1024)}
    print(f"[{label}] {log[label]['wall_s']} s, peak {log[label]['peak_rss_mb']} MB", flush=True)
    return log[label]


def sample_split(data: Path, source: str, name: str, indices: list[int], with_gold: bool) -> None:
    """Write a registered subset of a prepared split (records and, for dev, the gold lines)."""
    from sqltune.data.registry import lookup, register

    entry = lookup(data, source)
    rows = Path(entry["file_name"]).read_text().splitlines()
    (data / f"{name}.jsonl").write_text("".join(rows[i] + "\n" for i in indices))
    new = {k: v for k, v in entry.items() if k not in ("file_name", "gold")}
    new.update(file_name=data / f"{name}.jsonl", records=len(indices))
    if with_gold:
        gold = Path(entry["gold"]).read_text().splitlines()
        (data / f"{name}_gold.sql").write_text("".join(gold[i] + "\n" for i in indices))
        new["gold"] = data / f"{name}_gold.sql"
    register(data, name, new)


def table(metrics: dict) -> dict:
    s = metrics["scores"]
    return {lv: {"count": s[lv]["count"], "ex": s[lv]["exec"], "em": s[lv]["exact"]}
            for lv in ("easy", "medium", "hard", "extra", "all")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spider", default=str(ROOT.parent / "shared" / "spider"))
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--template", default="chatml")
    p.add_argument("--dev_sample", type=int, default=300)
    p.add_argument("--train_examples", type=int, default=720)
    p.add_argument("--train_minutes", type=float, default=60.0)
    p.add_argument("--max_source_length", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="train in bf16 (GPU)")
    p.add_argument("--out", default=str(ROOT / "runs" / "spider_dev_bench"))
    a = p.parse_args(argv)
    out = Path(a.out)
    data = out / "data"
    env = {**os.environ, "SQLTUNE_RUNS_DIR": str(out / "runs")}
    log: dict = {}
    started = time.time()

    run_stage("prepare", ["prepare", "--source", "spider", "--data_dir", a.spider, "--out", str(data)], log, env)
    dev_rows = [json.loads(line) for line in open(data / "spider_dev.jsonl")]
    db_dir = Path(json.loads((data / "dataset_info.json").read_text())["spider_dev"]["db_dir"])
    if not db_dir.is_absolute():
        db_dir = data / db_dir
    eligible = [i for i, r in enumerate(dev_rows) if (db_dir / r["db_id"] / f"{r['db_id']}.sqlite").is_file()]
    rng = random.Random(a.seed)
    dev_idx = sorted(rng.sample(eligible, a.dev_sample)) if 0 < a.dev_sample < len(eligible) else eligible
    n_train = sum(1 for _ in open(data / "spider_train.jsonl"))
    train_idx = sorted(random.Random(a.seed + 1).sample(range(n_train), min(a.train_examples, n_train)))
    sample_split(data, "spider_dev", "spider_devsample", dev_idx, with_gold=True)
    sample_split(data, "spider_train", "spider_trainsample", train_idx, with_gold=False)
    (out / "dev_questions.txt").write_text("".join(f"{i}\n" for i in dev_idx))

    common = ["--dataset_dir", str(data), "--template", a.template, "--max_source_length", str(a.max_source_length)]
    predict = ["--dataset", "spider_devsample", "--max_new_tokens", str(a.max_new_tokens), "--batch_size",
               str(a.batch_size)] + common
    evaluate = ["--gold", str(data / "spider_devsample_gold.sql"), "--db_dir", str(db_dir), "--tables",
                str(Path(a.spider) / "tables.json"), "--questions", str(data / "spider_devsample.jsonl")]
    results: dict = {}
    for label, model in (("base", a.model), ("finetuned", None)):
        if model is None:
            run_stage("train", ["train", "--model_name_or_path", a.model, "--dataset", "spider_trainsample",
                                "--output_dir", str(out / "adapter"), "--overwrite_output_dir",
                                "--finetuning_type", "lora", "--lora_rank", str(a.lora_rank), "--lora_alpha",
                                str(2 * a.lora_rank), "--lora_target", "all", "--learning_rate",
                                str(a.learning_rate), "--per_device_train_batch_size", "4",
                                "--num_train_epochs", "1", "--max_target_length", "128", "--warmup_ratio", "0.03",
                                "--max_train_minutes", str(a.train_minutes), "--logging_steps", "5",
                                "--save_steps", "50", "--plot_loss", "--seed", str(a.seed)]
                      + (["--bf16"] if a.bf16 else []) + common, log, env)
            run_stage("merge", ["merge", "--model_name_or_path", a.model, "--adapter", str(out / "adapter"),
                                "--out", str(out / "merged"), "--overwrite_output_dir"], log, env)
            model = str(out / "merged")
        pred = out / f"{label}.sql"
        run_stage(f"predict_{label}", ["predict", "--model_name_or_path", model, "--out", str(pred), "--overwrite"]
                  + predict, log, env)
        run_stage(f"evaluate_{label}", ["evaluate", "--pred", str(pred), "--report", str(out / f"eval_{label}"),
                                        "--quiet"] + evaluate, log, env)
        run_stage(f"evaluate_{label}_plug", ["evaluate", "--pred", str(pred), "--plug_value", "--quiet", "--report",
                                             str(out / f"eval_{label}_plug")] + evaluate, log, env)
        raw = [json.loads(line) for line in open(out / f"{label}.sql.raw.jsonl")]
        results[label] = {
            "table": table(json.loads((out / f"eval_{label}" / "metrics.json").read_text())),
            "plug_value_ex": json.loads((out / f"eval_{label}_plug" / "metrics.json").read_text())["ex"],
            "new_tokens": sum(r["new_tokens"] for r in raw), "prompts_cut": sum(r["prompt_cut"] for r in raw)}
        results[label]["generation_tokens_per_s"] = round(results[label]["new_tokens"] / log[f"predict_{label}"]["wall_s"], 1)
    train_figures = json.loads((out / "adapter" / "train_figures.json").read_text())
    summary = {"command": "python benchmarks/spider_dev.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "model": a.model, "dev_questions": len(dev_idx), "train_examples": len(train_idx),
               "train": train_figures, "stages": log, "results": results,
               "total_wall_min": round((time.time() - started) / 60, 1)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "section.md").write_text(render(summary))
    print(render(summary))
    return 0


def render(s: dict) -> str:
    b, f = s["results"]["base"], s["results"]["finetuned"]
    levels = ("easy", "medium", "hard", "extra", "all")
    lines = [f"Model `{s['model']}`; {s['dev_questions']} dev questions (seeded sample, databases present); "
             f"LoRA on {s['train']['records']} train records, {s['train']['steps']} steps "
             f"({s['train']['train_runtime_s'] / 60:.1f} min, {s['train']['tokens_per_s']} training tokens/s).", "",
             "| level | count | base EX | base EM | fine-tuned EX | fine-tuned EM |", "|---|---|---|---|---|---|"]
    for lv in levels:
        lines.append(f"| {lv} | {b['table'][lv]['count']} | {b['table'][lv]['ex']:.3f} | {b['table'][lv]['em']:.3f} | "
                     f"{f['table'][lv]['ex']:.3f} | {f['table'][lv]['em']:.3f} |")
    lines += ["", f"With `--plug_value`: base EX {b['plug_value_ex']:.3f}, fine-tuned EX {f['plug_value_ex']:.3f}.",
              f"Prompts cut to max_source_length: base {b['prompts_cut']}, fine-tuned {f['prompts_cut']}.", "",
              "| stage | wall s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']} | {v['peak_rss_mb']} |" for k, v in s["stages"].items()]
    lines += ["", f"Generation: base {b['new_tokens']} tokens at {b['generation_tokens_per_s']} tokens/s; fine-tuned "
              f"{f['new_tokens']} tokens at {f['generation_tokens_per_s']} tokens/s (stage wall time, load included).",
              f"Total wall time {s['total_wall_min']} min.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
