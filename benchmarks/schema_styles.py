"""Zero-shot EX of one model with each schema style, on the same seeded Spider dev questions (issue #16, section 2).

For every style: prepare Spider with it, take the same seeded sample of dev questions whose database exists, predict
greedily with the base model (by default the recipe's model, template, prompt length and batch), evaluate. Prints
one row per style (EX, EM, mean prompt tokens, prompts cut) and writes results.json and table.md into --out.
Accuracy only: stages run one after another (no timing ratio is claimed).

    python benchmarks/schema_styles.py [--spider ../shared/spider] [--model qwen2.5-coder-0.5b-instruct]
                                       [--dev_sample 50] [--styles words,ddl,ddl+rows,mschema] [--out DIR]
                                       [--max_source_length 512] [--predict_dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqltune.io import read_jsonl  # noqa: E402
from spider_dev import (  # noqa: E402
    ROOT, command_line, dev_db_dir, devsample_evaluation, recipe, run_stage, sample_split)


def main(argv: list[str] | None = None) -> int:
    whole = recipe()  # the recipe's model, template, prompt cap and prediction batch are the defaults
    pred = whole.get("predict") or {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spider", default=str(ROOT.parent / "shared" / "spider"))
    p.add_argument("--model", default=whole.get("model_name_or_path", "qwen2.5-coder-0.5b-instruct"))
    p.add_argument("--template", default=whole.get("template", "chatml"))
    p.add_argument("--styles", default="words,ddl,ddl+rows,mschema")
    p.add_argument("--dev_sample", type=int, default=50)
    p.add_argument("--sample_rows", type=int, default=3)
    p.add_argument("--max_source_length", type=int, default=whole.get("max_source_length", 512))
    p.add_argument("--max_new_tokens", type=int, default=pred.get("max_new_tokens", 128))
    p.add_argument("--batch_size", type=int, default=pred.get("batch_size", 8))
    p.add_argument("--predict_dtype", default="auto", help="predict --dtype: auto, float32 or bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/schema_styles")
    a = p.parse_args(argv)
    out = Path(a.out)
    env = {**os.environ, "SQLTUNE_RUNS_DIR": str(out / "runs")}
    log: dict = {}
    rows = []
    chosen: list[int] | None = None
    for style in [s.strip() for s in a.styles.split(",") if s.strip()]:
        data = out / style.replace("+", "_") / "data"
        run_stage(f"prepare_{style}", ["prepare", "--source", "spider", "--data_dir", a.spider, "--out", str(data),
                                       "--schema_style", style, "--sample_rows", str(a.sample_rows),
                                       "--splits", "dev"], log, env)
        db_dir = dev_db_dir(data)
        if chosen is None:  # the same questions for every style (dev records keep the source order)
            dev = list(read_jsonl(data / "spider_dev.jsonl"))
            eligible = [i for i, r in enumerate(dev) if (db_dir / r["db_id"] / f"{r['db_id']}.sqlite").is_file()]
            chosen = sorted(random.Random(a.seed).sample(eligible, a.dev_sample)) \
                if 0 < a.dev_sample < len(eligible) else eligible
        sample_split(data, "spider_dev", "spider_devsample", chosen, with_gold=True)
        pred = out / style.replace("+", "_") / "pred.sql"
        run_stage(f"predict_{style}", ["predict", "--model_name_or_path", a.model, "--dataset", "spider_devsample",
                                       "--dataset_dir", str(data), "--out", str(pred), "--overwrite", "--template",
                                       a.template, "--max_source_length", str(a.max_source_length),
                                       "--max_new_tokens", str(a.max_new_tokens), "--batch_size",
                                       str(a.batch_size), "--dtype", a.predict_dtype], log, env)
        report = out / style.replace("+", "_") / "eval"
        run_stage(f"evaluate_{style}", ["evaluate", "--pred", str(pred), "--report", str(report), "--quiet"]
                  + devsample_evaluation(data), log, env)
        metrics = json.loads((report / "metrics.json").read_text())
        raw = list(read_jsonl(pred.with_name(pred.name + ".raw.jsonl")))
        rows.append({"style": style, "count": metrics["count"], "ex": metrics["ex"], "em": metrics["em"],
                     "mean_prompt_tokens": round(sum(r["prompt_tokens"] for r in raw) / max(1, len(raw)), 1),
                     "prompts_cut": sum(bool(r.get("prompt_cut")) for r in raw)})
    lines = ["| schema style | count | EX | EM | mean prompt tokens | prompts cut |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['style']} | {r['count']} | {r['ex']:.3f} | {r['em']:.3f} | {r['mean_prompt_tokens']} | "
              f"{r['prompts_cut']} |" for r in rows]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"command": command_line("schema_styles.py", argv), "model": a.model, "dev_questions": len(chosen or []),
               "seed": a.seed, "max_source_length": a.max_source_length, "predict_dtype": a.predict_dtype,
               "rows": rows, "stages": log}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(table)
    best = max(rows, key=lambda r: (r["ex"], r["em"]))
    print(f"best zero-shot schema style: {best['style']} (EX {best['ex']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
