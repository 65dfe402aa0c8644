"""Training throughput of `sqltune train` against the plain transformers Trainer that users of DB-GPT-Hub and
LLaMA-Factory run, on the same records.

Baseline: `Trainer` + `DataCollatorForSeq2Seq` (each batch padded to its own longest example, labels padded with
-100), random order, the model's own loss, a peft LoRA. Every arm: the same model, LoRA (r16 on every linear layer,
alpha 32), batch size, learning rate, seed and records (one epoch: steps x batch records, each seen once, so every arm
trains on exactly the same real tokens; the baseline in --steps steps, sqltune's arms in as many as its batches take:
a database's remainder is a short batch of its own). The sqltune arms call `sqltune.train.sft.train` itself:

    default        sqltune's default settings (batches of one database's questions with their shared schema run
                   once, else length-grouped batches; loss computed on answer tokens only)
    unshared       the default with --no-share_prompt_prefix (length-grouped batches, each row run whole)
    packing        --packing (padding-free rows; flash_attention_2 on CUDA when flash_attn is installed)
    bf16           --bf16 (CPU only: on CUDA every arm, the baseline included, already runs in bf16)
    bf16_unshared  --bf16 --no-share_prompt_prefix (CPU only)

Records (--records): `grouped` (the default) are the first steps x batch examples of an epoch over the whole split
as sqltune batches it: what a run on the whole split trains on, most batches being questions of one database;
`random` are a seeded random steps x batch of the split (a small sample, where few questions share a database).

Each run is its own process (its peak memory is its own: RSS on CPU, CUDA max allocated on a GPU); arms alternate
(baseline, default, packing, bf16, baseline, ...) for --repeats rounds (at least 2). Tokens/s = real (non-padding)
tokens / the Trainer's training-loop time (model loading and saving excluded in every arm). Printed per arm: best and
median tokens/s, peak memory, mean training loss and its difference to the baseline's. The last line compares the
best run of sqltune's default arm with the best run of the baseline.

    python benchmarks/train_throughput.py --device cpu --model smollm2-135m-instruct --quick
    python benchmarks/train_throughput.py --device cpu --model qwen2.5-coder-0.5b-instruct
    python benchmarks/train_throughput.py --device cuda --model /path/to/model_folder

Records: Spider train from ../shared/spider when present (prepared once into the work folder), else demo records.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPIDER = ROOT.parent / "shared" / "spider"
LAST_LINE = "speed-up over a plain Trainer (DataCollatorForSeq2Seq): {:.2f}x"


def arm_settings(arm: str, device: str) -> dict:
    """TrainConfig values that make an arm, on top of the shared ones."""
    import importlib.util

    cuda = device == "cuda"
    settings = {"bf16": cuda}
    if arm == "packing":
        settings["packing"] = True
        if cuda and importlib.util.find_spec("flash_attn") is not None:
            settings["attn_implementation"] = "flash_attention_2"
    if arm.startswith("bf16"):
        settings["bf16"] = True
    if arm.endswith("unshared"):
        settings["share_prompt_prefix"] = False
    return settings


def arms_for(device: str) -> list[str]:
    return ["baseline", "default", "unshared", "packing"] + (["bf16", "bf16_unshared"] if device == "cpu" else [])


def grouped_records(data: str, dataset: str, steps: int, batch: int, seed: int = 0) -> str:
    """Register the first `steps` x `batch` records sqltune's sampler draws from the whole of `dataset` (seeded, one
    process: a database's remainder is a short batch of its own), in that order, as
    `<dataset>_grouped<steps>x<batch>`; returns the name. The one-database batches are the ones training draws; the
    pooled single leftovers are ordered by characters here (training orders them by tokens)."""
    from spider_dev import sample_split  # a registered subset of a prepared split, its lines byte for byte

    from sqltune.train.data import load_records
    from sqltune.train.shared_prefix import grouped_sampler, prefix_key

    name = f"{dataset}_grouped{steps}x{batch}"
    records = load_records(data, dataset)
    sampler = grouped_sampler([prefix_key(r) for r in records], [len(r["input"]) for r in records], batch, seed, 1)
    drawn = [i for b in sampler.batches() for i in b]  # one process's draw: a remainder is a batch of its own
    sample_split(Path(data), dataset, name, drawn[:steps * batch], with_gold=False)
    return name


def prepare_records(work: Path) -> tuple[str, str]:
    """(dataset_dir, dataset name): Spider train when ../shared/spider exists, else the demo records."""
    from sqltune.config import PrepareConfig
    from sqltune.data.prepare import prepare

    data = work / "data"
    spider = (SPIDER / "train_spider.json").is_file()
    name = "spider" if spider else "demo"
    if not (data / "dataset_info.json").is_file():
        cfg = PrepareConfig(source="spider", data_dir=str(SPIDER), out=str(data), name=name, splits="train") if spider \
            else PrepareConfig(source="demo", out=str(data), name=name, splits="train")
        prepare(cfg)
    return str(data), f"{name}_train"


def train_config(a, arm: str, out: Path):
    from sqltune.config import TrainConfig

    return TrainConfig(model_name_or_path=a.model, dataset=a.dataset, dataset_dir=a.data, template=a.template,
                       output_dir=str(out), overwrite_output_dir=True, lora_rank=16, lora_alpha=32, lora_target="all",
                       max_samples=a.steps * a.batch, per_device_train_batch_size=a.batch, num_train_epochs=1,
                       learning_rate=2e-4, max_source_length=a.max_source_length,
                       max_target_length=a.max_target_length, logging_steps=1, save_steps=10 ** 6, seed=0,
                       **arm_settings(arm, a.device))


def baseline(cfg) -> dict:
    """The plain Trainer run: DataCollatorForSeq2Seq, random order, the model's own loss, a peft LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from sqltune.loading import load_tokenizer, resolve
    from sqltune.templates import get_template
    from sqltune.train.data import load_records, tokenize_records

    set_seed(cfg.seed)
    path = resolve(cfg.model_name_or_path)
    tok = load_tokenizer(path)
    records = load_records(cfg.dataset_dir, cfg.dataset, cfg.max_samples, cfg.seed)
    dataset, figures = tokenize_records(records, tok, get_template(cfg.template, tok), cfg.max_source_length,
                                        cfg.max_target_length)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=cfg.output_dir, per_device_train_batch_size=cfg.per_device_train_batch_size,
                             num_train_epochs=1, learning_rate=cfg.learning_rate,
                             lr_scheduler_type=cfg.lr_scheduler_type, logging_steps=1, save_strategy="no",
                             report_to="none", bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=dataset.remove_columns(["length"]),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    result = trainer.train()
    return {"train_loss": result.training_loss, "train_tokens": figures["train_tokens"],
            "steps": trainer.state.global_step}


@contextlib.contextmanager
def step_times():
    """(time, real tokens seen) at the end of every optimizer step of whichever Trainer the arm builds (sqltune's own
    train() included): within the block, the Trainer's constructor adds one callback."""
    import time

    import torch
    import transformers

    marks: list[tuple[float, int]] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    init = transformers.Trainer.__init__

    def timed_init(self, *args, callbacks=None, **kw):
        init(self, *args, callbacks=list(callbacks or []) + [StepTimer()], **kw)

    transformers.Trainer.__init__ = timed_init
    try:
        yield marks
    finally:
        transformers.Trainer.__init__ = init


def run_arm(a) -> dict:
    """One run of one arm, in this process. Tokens/s is measured after the first optimizer step (warm-up: first
    kernel choices, allocations) to the end of the last, on the real tokens of those steps, in every arm alike."""
    import resource

    import torch

    from sqltune.train.sft import train

    cfg = train_config(a, a.arm, Path(a.work) / f"{a.arm}-{a.round}")
    with step_times() as marks:
        figures = baseline(cfg) if a.arm == "baseline" else train(cfg)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if len(marks) < 2 or marks[-1][1] != figures["train_tokens"]:
        raise SystemExit(f"arm {a.arm}: {len(marks)} steps timed, {marks[-1][1] if marks else 0} tokens counted of "
                         f"{figures['train_tokens']}")
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return {"arm": a.arm, "seconds": t1 - t0, "real_tokens": n1, "tokens_per_s": (n1 - n0) / (t1 - t0),
            "peak_mb": round(peak), "loss": figures["train_loss"], "steps": figures["steps"]}


def spawn(a, arm: str, round_: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, __file__, "--arm", arm, "--round", str(round_), "--work", a.work, "--data", a.data,
           "--dataset", a.dataset]
    cmd += [x for k in ("device", "model", "template", "steps", "batch", "max_source_length", "max_target_length")
            for x in (f"--{k}", str(getattr(a, k)))]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"train_throughput: arm {arm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def summary(runs: dict[str, list[dict]], headline: str = "default") -> list[str]:
    """The per-arm lines and the last line (the headline arm's best run over the baseline's best run)."""
    base = runs["baseline"]
    base_loss = statistics.median(r["loss"] for r in base)
    lines = []
    for arm, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        loss = statistics.median(r["loss"] for r in rs)
        ratio = max(tps) / max(r["tokens_per_s"] for r in base)
        lines.append(f"{arm:<13} tokens/s best {max(tps):8.1f}  median {statistics.median(tps):8.1f}  ({ratio:.2f}x)  "
                     f"peak {max(r['peak_mb'] for r in rs):6d} MB  loss {loss:.4f} "
                     f"({100 * (loss - base_loss) / base_loss:+.2f} % vs baseline)  runs {len(rs)}")
    best = max(r["tokens_per_s"] for r in runs[headline]) / max(r["tokens_per_s"] for r in base)
    lines.append(f"(last line: sqltune arm {headline!r}, best run against the baseline's best run)")
    lines.append(LAST_LINE.format(best))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder or catalog name")
    p.add_argument("--quick", action="store_true",
                   help="3 steps x batch 2, prompts cut at 256 tokens, 2 rounds (about 5 minutes on 2 cores)")
    p.add_argument("--template", default="chatml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max_source_length", type=int, default=512)
    p.add_argument("--max_target_length", type=int, default=128)
    p.add_argument("--arms", default="", help="comma list (default: all for the device); the baseline always runs")
    p.add_argument("--records", choices=["grouped", "random"], default="grouped",
                   help="grouped: the first steps x batch examples of sqltune's epoch over the whole split; random: a "
                        "seeded random steps x batch of it")
    p.add_argument("--headline", default="default", choices=["default", "packing", "bf16"],
                   help="the sqltune arm the last line compares with the baseline")
    p.add_argument("--work", default="")
    p.add_argument("--data", default="", help="prepared dataset folder (default: Spider train prepared into the work "
                                              "folder from ../shared/spider, else demo records)")
    p.add_argument("--dataset", default="", help="registry name in --data, e.g. spider_train")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arm:
        print("RESULT " + json.dumps(run_arm(a)), flush=True)
        return 0
    if a.quick:
        a.steps, a.batch, a.repeats, a.max_source_length = 3, 2, 2, min(a.max_source_length, 256)
    a.repeats = max(2, a.repeats)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("train_throughput: --device cuda but no CUDA device is visible")
            return 2
    a.work = a.work or tempfile.mkdtemp(prefix="sqltune-train-bench-")
    if not a.data:
        a.data, a.dataset = prepare_records(Path(a.work))
    elif not a.dataset:
        p.error("--data needs --dataset")
    if a.records == "grouped":
        a.dataset = grouped_records(a.data, a.dataset, a.steps, a.batch)
    arms = arms_for(a.device)
    if a.arms:
        wanted = {x.strip() for x in a.arms.split(",") if x.strip()}
        arms = ["baseline"] + [x for x in arms if x in wanted and x != "baseline"]
    if a.headline not in arms:
        arms.append(a.headline)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for round_ in range(a.repeats):
        for arm in arms:
            r = spawn(a, arm, round_)
            runs[arm].append(r)
            print(f"round {round_ + 1} {arm:<13} {r['tokens_per_s']:8.1f} tokens/s  {r['seconds']:6.1f} s  "
                  f"peak {r['peak_mb']} MB  loss {r['loss']:.4f}", flush=True)
    tokens = runs["baseline"][0]["real_tokens"]
    if any(r["real_tokens"] != tokens for rs in runs.values() for r in rs):
        print("train_throughput: the arms did not train on the same tokens")
        return 1
    print(f"model {a.model} on {a.device}, {a.dataset}, {a.steps} steps x batch {a.batch}, {tokens} real tokens per "
          f"run, {a.repeats} rounds, arms alternating")
    print("\n".join(summary(runs, a.headline)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
