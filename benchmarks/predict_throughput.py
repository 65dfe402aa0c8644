"""Batched generation against one-prompt-at-a-time generation, on the same model and prompts, in one run.

Both arms use sqltune's generator (left padding, greedy); the batched arm must produce exactly the same SQL.

    python benchmarks/predict_throughput.py [--model smollm2-135m-instruct] [--prompts 32] [--batch 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--template", default="chatml")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32 or bfloat16")
    p.add_argument("--work", default="")
    a = p.parse_args()

    from sqltune.config import PredictConfig, PrepareConfig
    from sqltune.data.prepare import prepare
    from sqltune.infer.predict import HFGenerator
    from sqltune.io import read_jsonl
    from sqltune.templates import encode_prompt

    work = Path(a.work or tempfile.mkdtemp(prefix="sqltune-predict-bench-"))
    if not (work / "data" / "dataset_info.json").is_file():
        prepare(PrepareConfig(source="demo", out=str(work / "data"), name="demo"))
    records = list(read_jsonl(work / "data" / "demo_dev.jsonl"))[: a.prompts]
    gen = HFGenerator(PredictConfig(model_name_or_path=a.model, template=a.template, max_new_tokens=a.max_new_tokens,
                                    dtype=a.dtype))
    prompts = [encode_prompt(gen.tokenizer, gen.template, r, 1024)[0] for r in records]
    gen.generate(prompts[:2])  # warm-up

    start = time.perf_counter()
    single = [gen.generate([p])[0] for p in prompts]
    t_single = time.perf_counter() - start
    start = time.perf_counter()
    batched = [r for i in range(0, len(prompts), a.batch) for r in gen.generate(prompts[i:i + a.batch])]
    t_batched = time.perf_counter() - start

    tokens_single = sum(n for _, n in single)
    tokens_batched = sum(n for _, n in batched)
    same = sum(s[0] == b[0] for s, b in zip(single, batched))
    print(f"model {a.model} ({a.dtype}), {len(prompts)} prompts, max_new_tokens {a.max_new_tokens}, batch {a.batch}")
    print(f"one at a time: {tokens_single} tokens in {t_single:.1f} s = {tokens_single / t_single:.1f} tokens/s")
    print(f"batched:       {tokens_batched} tokens in {t_batched:.1f} s = {tokens_batched / t_batched:.1f} tokens/s")
    print(f"speed-up: {(tokens_batched / t_batched) / (tokens_single / t_single):.2f}x; identical greedy outputs: "
          f"{same}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
