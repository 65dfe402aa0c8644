"""The train stage: supervised fine-tuning on prepared records with the transformers Trainer.

Read top to bottom: resolve the model, check the output folder, tokenise the records with the chat template
(loss on answer tokens only), set up the trainable parameters for the finetuning type, train with length-grouped
batches, then save the adapter (or model), tokenizer, resolved config, log and loss plot.

Several processes: launch the same command with `torchrun --nproc_per_node N -m sqltune train ...` or
`accelerate launch -m sqltune train ...`; the Trainer does the rest (gloo on CPU, NCCL on GPUs). A DeepSpeed or
FSDP config is passed through (`--deepspeed ds.json`, or an Accelerate config file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from sqltune.config import TrainConfig, to_dict
from sqltune.errors import SqltuneError
from sqltune.loading import load_model, load_tokenizer, resolve
from sqltune.templates import get_template
from sqltune.train.data import Collator, load_records, tokenize_records
from sqltune.train.loss import install_label_only_loss
from sqltune.train.memory import preflight
from sqltune.train.setup import gradient_check, parallel_args, setup_trainable, train_dtype

TRAIN_LOG = "trainer_log.jsonl"
RESOLVED_CONFIG = "sqltune_train.yaml"


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_output_dir(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from (with --resume), after refusing to overwrite a finished or foreign folder."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.output_dir)
    if cfg.resume:
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise SqltuneError(f"--resume: no checkpoint-* folder in {out} to resume from")
        return last
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite_output_dir:
            raise SqltuneError(f"output_dir {out} exists and is not empty (pass --overwrite_output_dir to replace "
                               "it, or --resume to continue its latest checkpoint)")
        if _world()[0] == 0:
            shutil.rmtree(out)
    return None


def _callbacks(cfg: TrainConfig, collator: Collator, resume_step: int):
    from transformers import TrainerCallback

    log_path = Path(cfg.output_dir) / TRAIN_LOG

    class JsonlLog(TrainerCallback):
        """Appends each logged step to trainer_log.jsonl (a resumed run first drops the lines after its checkpoint)."""

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero and log_path.is_file():
                keep = [l for l in log_path.read_text().splitlines() if l.strip() and
                        json.loads(l).get("step", 0) <= resume_step]
                log_path.write_text("".join(k + "\n" for k in keep))

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, **{k: v for k, v in logs.items()
                                                                         if isinstance(v, (int, float))}}
            row["tokens_seen"] = collator.tokens_seen
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    class GradientCheck(TrainerCallback):
        """Before the first optimizer step: every trainable parameter must have a finite gradient."""

        checked = False

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if self.checked or model is None:
                return
            self.checked = True
            bad = gradient_check(args, model)  # None under DeepSpeed/FSDP; fp16 overflow steps are not counted
            if bad:
                raise SqltuneError(f"{len(bad)} trainable parameters got no gradient in the first step "
                                   f"(first: {bad[0]}); training would silently learn nothing")

    class RankDigest(TrainerCallback):
        """With several processes, each rank writes a digest of its trainable weights (they must agree)."""

        def on_train_end(self, args, state, control, model=None, **kw):
            rank, world = _world()
            if world > 1 and model is not None:
                h = hashlib.sha256()
                for name, p in sorted(model.named_parameters()):
                    if p.requires_grad:
                        h.update(name.encode())
                        h.update(p.detach().float().cpu().numpy().tobytes())
                Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
                (Path(cfg.output_dir) / f"rank{rank}_weights.sha256").write_text(h.hexdigest() + "\n")

    class TimeBudget(TrainerCallback):
        """Stops training (the final save still happens) once max_train_minutes have passed."""

        started = None

        def on_train_begin(self, args, state, control, **kw):
            self.started = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            if cfg.max_train_minutes and time.monotonic() - self.started > cfg.max_train_minutes * 60:
                control.should_training_stop = True
            return control

    return [JsonlLog(), GradientCheck(), RankDigest(), TimeBudget()]


def plot_loss(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()] if log_path.is_file() else []
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points), marker="o", markersize=2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("sqltune train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def train(cfg: TrainConfig) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(cfg.seed)  # before the adapter is initialised, so a run is reproducible from its seed
    model_path = resolve(cfg.model_name_or_path)
    checkpoint = check_output_dir(cfg)
    tokenizer = load_tokenizer(model_path)
    template = get_template(cfg.template, tokenizer)
    records = load_records(cfg.dataset_dir, cfg.dataset, cfg.max_samples, cfg.seed)
    dataset, data_figures = tokenize_records(records, tokenizer, template, cfg.max_source_length,
                                             cfg.max_target_length)

    quant = cfg.quantization_bit if cfg.finetuning_type == "qlora" else None
    dtype = train_dtype(cfg)
    if (warning := preflight(cfg, model_path, dtype.itemsize)) and _world()[0] == 0:
        print(f"train: {warning}", file=sys.stderr)
    model = setup_trainable(load_model(model_path, quant, dtype=dtype, attn_implementation=cfg.attn_implementation),
                            cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise SqltuneError("no parameter is trainable with these settings")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    data_figures["loss_kernel"] = install_label_only_loss(model)  # no full-vocabulary logits (sqltune/train/loss.py)

    resume_step = int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
    warmup_steps = 0
    if cfg.warmup_ratio:
        steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
            len(dataset) / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps) * cfg.num_train_epochs)
        warmup_steps = int(steps * cfg.warmup_ratio)
    args = TrainingArguments(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=warmup_steps, weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        seed=cfg.seed, data_seed=cfg.seed, report_to=cfg.report_to, remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length", **parallel_args(cfg), ddp_find_unused_parameters=False,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), logging_first_step=True,
        disable_tqdm=False)
    collator = Collator(tokenizer.pad_token_id, packing=cfg.packing)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=_callbacks(cfg, collator, resume_step))
    result = trainer.train(resume_from_checkpoint=checkpoint)

    out = Path(cfg.output_dir)
    trainer.save_model(str(out))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    runtime = result.metrics.get("train_runtime", 0.0) or 1e-9
    figures = {"train_loss": result.training_loss, "final_loss": losses[-1] if losses else None,
               "first_loss": losses[0] if losses else None, "steps": trainer.state.global_step,
               "records": len(records), "trainable_params": trainable, "train_runtime_s": round(runtime, 2),
               "tokens_per_s": round(collator.tokens_seen / runtime, 1), **data_figures}
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        resolved = {**to_dict(cfg), "model_path": str(model_path.resolve()), "template_resolved": template.name}
        (out / RESOLVED_CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False))
        (out / "train_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
        if cfg.plot_loss:
            plot_loss(out / TRAIN_LOG, out / "training_loss.png")
    return figures
