"""Generation throughput of `sqltune predict`'s generator in float32 and bfloat16 at batch sizes 1, 16 and 64, on the
same prompts and device, in one run.

Each (dtype, batch) arm generates greedily for the same --prompts prompts (demo dev records) with sqltune's
generator (left padding, stop at the template's end marker); the model is loaded once per dtype and warmed up at
every batch size before timing. Tokens/s counts generated tokens (up to the stop token). Printed per arm: tokens/s,
seconds, and how many answers equal the same dtype's batch-1 answers (batched greedy decoding need not be
bit-identical: padding changes the floating-point sums, most of all in bfloat16). On CUDA, peak memory per dtype.

With --vote N, the vote's sampling is timed instead: N samples per prompt, --vote_batch prompts per call, each prompt
read once with its cache shared by its samples (what `predict --vote` does) against generate's own
num_return_sequences, which reads every prompt N times; the arms alternate, --repeats times, the same seed for both.

    python benchmarks/predict_throughput.py --device cpu [--model smollm2-135m-instruct] [--prompts 64]
    python benchmarks/predict_throughput.py --device cuda --model /path/to/model_folder
    python benchmarks/predict_throughput.py --vote 8 --records PREPARED.jsonl --model qwen2.5-coder-0.5b-instruct

With --backend hf,vllm, sqltune's two generators are timed against each other instead, each arm in a process of its
own (benchmarks/backend_arms.py says how):

    python benchmarks/predict_throughput.py --backend hf,vllm --records PREPARED.jsonl --prompts 64 --vote 8 \
        --vote_prompts 16 --max_new_tokens 128 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--template", default="chatml")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batches", default="1,16,64", help="comma list of batch sizes")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list: float32, bfloat16")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--work", default="")
    p.add_argument("--records", default="", help="prepared JSONL to take prompts from (default: demo dev records)")
    p.add_argument("--max_source_length", type=int, default=1024)
    p.add_argument("--vote", type=int, default=0, help="time vote@N sampling, shared prompt against repeated")
    p.add_argument("--vote_batch", type=int, default=2, help="prompts per sampling call with --vote")
    p.add_argument("--repeats", type=int, default=2, help="alternations of the two --vote (or --backend) arms")
    p.add_argument("--backend", default="", help="hf,vllm: time sqltune's HF generator against its vLLM backend; "
                   "vllm_auto: the vLLM backend under vLLM's own CPU binding (VLLM_CPU_OMP_THREADS_BIND=auto); "
                   "vllm_preload: started with tcmalloc and Intel OpenMP preloaded (LD_PRELOAD)")
    p.add_argument("--batch_size", type=int, default=8, help="--backend: the HF arm's prompts per call")
    p.add_argument("--vote_prompts", type=int, default=16, help="--backend with --vote N: prompts sampled at vote@N")
    p.add_argument("--hf_python", default=str(ROOT / ".venv" / "bin" / "python"), help="--backend: the HF arm's Python")
    p.add_argument("--vllm_python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="--backend: the vLLM arm's Python (vllm installed)")
    p.add_argument("--vllm_compile", action="store_true",
                   help="--backend: vLLM compiles its model at start (predict's default) instead of --enforce_eager")
    p.add_argument("--seed", type=int, default=42, help="--backend: sampling seed of both arms (predict's default)")
    p.add_argument("--kv_block_size", type=int, default=0, help=argparse.SUPPRESS)  # a variant arm's, for its child
    p.add_argument("--arm", default="", help=argparse.SUPPRESS)  # set by --backend for its child processes
    a = p.parse_args(argv)
    if a.arm or a.backend:
        from backend_arms import backend_arms, child_arm

        return child_arm(a) if a.arm else backend_arms(a)
    if a.records and not Path(a.records).is_file():
        print(f"predict_throughput: --records {a.records} not found (a prepared JSONL, e.g. data/spider_dev.jsonl)")
        return 2
    if a.vote == 1 or a.vote < 0:
        print("predict_throughput: --vote must be 0 (greedy arms) or at least 2")
        return 2
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("predict_throughput: --device cuda but no CUDA device is visible")
        return 2

    from sqltune.config import PredictConfig, PrepareConfig
    from sqltune.data.prepare import prepare
    from sqltune.infer.hf_backend import HFGenerator
    from sqltune.io import read_jsonl
    from sqltune.templates import encode_prompt

    if a.records:
        records = list(read_jsonl(Path(a.records)))
    else:
        work = Path(a.work or tempfile.mkdtemp(prefix="sqltune-predict-bench-"))
        if not (work / "data" / "dataset_info.json").is_file():
            prepare(PrepareConfig(source="demo", out=str(work / "data"), name="demo"))
        records = list(read_jsonl(work / "data" / "demo_dev.jsonl"))
    records = (records * (a.prompts // max(1, len(records)) + 1))[: a.prompts]
    if a.vote:
        return vote_arms(a, records)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    rows = []
    for dtype in [d.strip() for d in a.dtypes.split(",") if d.strip()]:
        gen = HFGenerator(PredictConfig(model_name_or_path=a.model, template=a.template,
                                        max_new_tokens=a.max_new_tokens, dtype=dtype))
        prompts = [encode_prompt(gen.tokenizer, gen.template, r, a.max_source_length)[0] for r in records]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        reference = None
        for b in batches:
            gen.generate(prompts[:b])  # warm-up at this batch size
            start = time.perf_counter()
            out = [r for i in range(0, len(prompts), b) for r in gen.generate(prompts[i:i + b])]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            reference = reference or out
            tokens = sum(n for _, n in out)
            same = sum(x[0] == y[0] for x, y in zip(out, reference))
            rows.append((dtype, b, tokens / seconds, seconds, same))
            print(f"{dtype:<9} batch {b:>3}: {tokens / seconds:8.1f} tokens/s  {seconds:6.1f} s  "
                  f"same answers as batch {batches[0]}: {same}/{len(prompts)}", flush=True)
        if torch.cuda.is_available():
            print(f"{dtype:<9} peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB")
        del gen
    print(f"model {a.model} on {device_name(a)}, {len(records)} prompts, max_new_tokens {a.max_new_tokens}")
    for b in batches:
        by = {d: t for d, bb, t, _, _ in rows if bb == b}
        if "float32" in by and "bfloat16" in by:
            print(f"batch {b:>3}: bfloat16 / float32 = {by['bfloat16'] / by['float32']:.2f}x")
    return 0


def device_name(a) -> str:
    import torch

    return torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU ({os.cpu_count()} cores)"


def vote_arms(a, records: list[dict]) -> int:
    """Sampling for the vote: shared prompt cache against generate's num_return_sequences, arms alternated."""
    import torch

    from sqltune.config import PredictConfig
    from sqltune.infer.hf_backend import HFGenerator
    from sqltune.infer.vote import generate_candidates
    from sqltune.templates import encode_prompt

    dtype = a.dtypes.split(",")[0].strip()
    gen = HFGenerator(PredictConfig(model_name_or_path=a.model, template=a.template, dtype=dtype))
    prompts = [encode_prompt(gen.tokenizer, gen.template, r, a.max_source_length)[0] for r in records]
    b = a.vote_batch

    def sample(share: bool, some: list[list[int]]) -> list[list[dict]]:
        return [row for i in range(0, len(some), b)
                for row in generate_candidates(gen.model, gen.tokenizer, some[i:i + b], gen.stop, a.vote, 0.7, 1.0,
                                               False, a.max_new_tokens, share_prompt=share)]

    sample(True, prompts[:b]), sample(False, prompts[:b])  # warm-up
    seconds = {True: [], False: []}
    texts: dict[bool, list[list[str]]] = {}
    for _ in range(a.repeats):
        for share in (False, True):
            torch.manual_seed(0)
            start = time.perf_counter()
            out = sample(share, prompts)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[share].append(time.perf_counter() - start)
            texts[share] = [[c["text"] for c in row] for row in out]
    same = sum(x == y for x, y in zip(texts[False], texts[True]))  # the last round's samples
    tokens = sum(len(p) for p in prompts) / len(prompts)
    print(f"model {a.model} ({dtype}) on {device_name(a)}, {len(prompts)} prompts (mean {tokens:.0f} tokens), vote@{a.vote}, "
          f"{b} prompts per call, max_new_tokens {a.max_new_tokens}, {a.repeats} alternations")
    for share, name in ((False, "prompt repeated per sample"), (True, "prompt read once, cache shared")):
        print(f"{name:<31}: " + ", ".join(f"{s:.1f} s" for s in seconds[share]))
    print(f"prompts whose samples are identical in both arms (same seed): {same}/{len(prompts)}")
    ratio = min(seconds[False]) / min(seconds[True])
    print(f"vote@{a.vote} sampling, shared prompt over repeated prompt (best of each): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
