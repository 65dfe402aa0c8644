"""The train stage: supervised fine-tuning on prepared records with the transformers Trainer.

Read top to bottom: check every input (model, dataset, output folder against the inputs, settings of a resumed
run), tokenise the records with the chat template (loss on answer tokens only), set up the trainable parameters for
the finetuning type, train with length-grouped batches in the work folder, then save the adapter (or model),
tokenizer, log and loss plot and put the finished folder in place (sqltune/train/folders.py: the old output is
replaced only by a complete new one). The figures describe the whole run, also after a resume and over all processes.

Several processes: launch the same command with `torchrun --nproc_per_node N -m sqltune train ...` or
`accelerate launch -m sqltune train ...`; the Trainer does the rest (gloo on CPU, NCCL on GPUs). A DeepSpeed or
FSDP config is passed through (`--deepspeed ds.json`, or an Accelerate config file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml

from sqltune.config import TrainConfig, parse_yaml, to_dict
from sqltune.data.registry import lookup_many
from sqltune.digest import model_digest, records_digest
from sqltune.errors import SqltuneError
from sqltune.io import append_once, atomic_write, refuse_link, write_json
from sqltune.loading import load_model, load_tokenizer, resolve
from sqltune.progress import Progress, quiet_libraries
from sqltune.templates import get_template
import sqltune.train.folders as folders
from sqltune.train.data import Collator, load_records, tokenize_records
from sqltune.train.loss import install_label_only_loss
from sqltune.train.memory import preflight
from sqltune.train.setup import gradient_check, parallel_args, setup_trainable, train_dtype

TRAIN_LOG = "trainer_log.jsonl"
RESOLVED_CONFIG = "sqltune_train.yaml"


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if dist := _distributed():
        dist.barrier()


def from_rank0(value):
    """Rank 0's value on every process (so that all of them stop at the same step, follow the same schedule and none
    waits forever)."""
    if not (dist := _distributed()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _now() -> float:
    return time.monotonic()


class BudgetClock:
    """Share of the time budget spent so far, over the whole run: the seconds of earlier sessions (saved in each
    checkpoint) plus this session's, read by rank 0's clock for every process."""

    def __init__(self, budget_s: float, spent_before_s: float = 0.0):
        self.budget_s, self.spent_before_s = budget_s, spent_before_s
        self.started: float | None = None
        self.fraction = spent_before_s / budget_s

    def start(self) -> None:
        self.started = _now()

    def spent_s(self) -> float:
        return self.spent_before_s + (_now() - self.started if self.started is not None else 0.0)

    def tick(self) -> float:
        self.fraction = float(from_rank0(self.spent_s() / self.budget_s))
        return self.fraction


def follow_budget(scheduler, clock: BudgetClock, total_steps: int) -> None:
    """Make the schedule run at max(step, budget share x total steps): it reaches its end with the time budget when
    the budget ends first, and is unchanged when the steps do (every schedule sqltune offers is a LambdaLR)."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(scheduler, LambdaLR):
        raise SqltuneError(f"--schedule_to_budget cannot follow a {type(scheduler).__name__} learning-rate schedule")
    scheduler.lr_lambdas = [(lambda step, f=f: f(max(step, clock.fraction * total_steps)))
                            for f in scheduler.lr_lambdas]


def spent_before(checkpoint: Path | None) -> float:
    """Seconds of training a checkpoint's run had spent (0 without one, or when it did not follow a budget)."""
    if not checkpoint:
        return 0.0
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("stateful_callbacks", {})
    entry = saved.get("BudgetSchedule")
    entry = entry[0] if isinstance(entry, list) and entry else entry
    return float((entry or {}).get("attributes", {}).get("spent_s", 0.0))


# how the run is carried out, not what it learns: these may change between a run and its resume
EXECUTION_ONLY = {"resume", "overwrite_output_dir", "output_dir", "max_train_minutes", "logging_steps", "save_steps",
                  "save_total_limit", "plot_loss", "report_to", "quiet", "gradient_checkpointing", "attn_implementation",
                  "model_name_or_path", "dataset_dir"}  # the last two are compared resolved (model_path, dataset_path)


# digests of what the run read, said in words (two hashes tell a user nothing)
CONTENT_CHANGED = {"records_sha256": "the training records changed (the dataset was edited in place)",
                   "model_sha256": "the base model folder's files changed"}


def settings_changed(saved: dict, current: dict) -> list[str]:
    """`name saved -> current` for each setting that differs from the run being resumed (paths compared resolved;
    a setting the saved file does not know is not compared)."""
    return [CONTENT_CHANGED.get(key) or f"{key} {saved[key]!r} -> {value!r}" for key, value in current.items()
            if key not in EXECUTION_ONLY and key in saved and saved[key] != value]


def check_resume_settings(work: Path, current: dict) -> None:
    path = work / RESOLVED_CONFIG
    if not path.is_file():
        return  # a checkpoint written before settings were saved at the start: nothing to compare
    saved = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}  # aliases bounded
    changed = settings_changed(saved, current)
    if changed:
        raise SqltuneError(f"--resume: settings differ from the checkpoint's run ({path}): {'; '.join(changed)}. "
                           "Resume with the saved settings, or start again with --overwrite_output_dir")


def _inputs(cfg: TrainConfig, model_path: Path) -> dict[str, Path]:
    """Everything the run reads; the output folder may not overlap any of them."""
    inputs = {"model folder": model_path, "dataset folder": Path(cfg.dataset_dir)}
    for entry in lookup_many(cfg.dataset_dir, cfg.dataset):
        inputs[f"dataset file {Path(entry['file_name']).name}"] = Path(entry["file_name"])
    if cfg.deepspeed:
        inputs["DeepSpeed config"] = Path(cfg.deepspeed)
    if cfg.fsdp_config:
        inputs["FSDP config"] = Path(cfg.fsdp_config)
    return inputs


def _callbacks(cfg: TrainConfig, work: Path, resume_step: int, clock: BudgetClock | None):
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    log_path = work / TRAIN_LOG

    class JsonlLog(TrainerCallback):
        """Appends each logged step to trainer_log.jsonl (a resumed run first drops the lines after its checkpoint),
        never through a symbolic link (one line instead)."""

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                refuse_link(log_path, "the training log")  # a resume would read its target and copy it in
            if state.is_world_process_zero and log_path.is_file():
                keep = [x for x in log_path.read_text().splitlines() if x.strip() and
                        json.loads(x).get("step", 0) <= resume_step]
                with atomic_write(log_path) as handle:
                    handle.write("".join(k + "\n" for k in keep))

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, **{k: v for k, v in logs.items()
                                                                         if isinstance(v, (int, float))}}
            row["tokens_seen"] = state.num_input_tokens_seen  # every process, the whole run
            append_once(log_path, json.dumps(row) + "\n")  # never through a link planted at the log's place

    class FiniteLoss(TrainerCallback):
        """A NaN or infinite loss stops training with one line (the logged loss is averaged over all processes, so
        every process stops together)."""

        def on_log(self, args, state, control, logs=None, **kw):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise SqltuneError(f"training stopped at step {state.global_step}: the loss is {loss} "
                                   f"(learning rate {cfg.learning_rate}: try a lower --learning_rate)")

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
                work.mkdir(parents=True, exist_ok=True)
                with atomic_write(work / f"rank{rank}_weights.sha256") as handle:  # replaces a link, never follows it
                    handle.write(h.hexdigest() + "\n")

    class BudgetSchedule(TrainerCallback, ExportableState):
        """With --max_train_minutes: reads the budget clock after each optimizer step (before the schedule moves,
        which follows it with --schedule_to_budget), stops once the budget is spent (the final save still happens),
        and saves the seconds spent in each checkpoint for a resume."""

        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_optimizer_step(self, args, state, control, **kw):
            clock.tick()

        def on_step_end(self, args, state, control, **kw):
            if clock.fraction >= 1:
                control.should_training_stop = True
            return control

        def state(self) -> dict:
            return {"args": {}, "attributes": {"spent_s": clock.spent_s()}}

    class StepControl(TrainerCallback):
        """Logs at every checkpoint and at the last step (also one the budget stops at), so the log covers every step
        and the figures of a resumed run cover the whole run."""

        def on_step_end(self, args, state, control, **kw):
            if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
                control.should_log = True
            return control

    class ShowProgress(TrainerCallback):
        """Steps done of the planned ones, time spent and left, the last loss, learning rate and tokens/s on stderr
        (sqltune/progress.py: a bar on a terminal, a line now and then in a log, nothing with --quiet), on the first
        process only. A step that logs is counted in on_log, so its line shows its own loss."""

        bar: Progress | None = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = Progress(state.max_steps, "train", "step", quiet=cfg.quiet, summary=True,
                                    initial=min(state.global_step, state.max_steps))
                self.last = (time.monotonic(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None and not control.should_log:
                self.bar.advance_to(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is None or not logs or "loss" not in logs or not math.isfinite(logs["loss"]):
                return
            now, tokens = time.monotonic(), state.num_input_tokens_seen
            rate = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
            self.last = (now, tokens)
            self.bar.postfix(**progress_figures(logs, rate))
            self.bar.advance_to(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.advance_to(state.global_step)  # a last step whose log showed no loss
            self.close_progress()

        def close_progress(self):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    budget = [BudgetSchedule()] if clock else []  # before StepControl, which logs the step it stops at
    # ShowProgress last: it reads whether StepControl made this step log
    return [JsonlLog(), FiniteLoss(), GradientCheck(), RankDigest(), *budget, StepControl(), ShowProgress()]


def progress_figures(logs: dict, tokens_per_s: float) -> dict:
    """The figures shown after the progress counts: the last logged loss, learning rate and tokens/s."""
    return {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0.0):.3g}",
            "tokens/s": f"{tokens_per_s:.0f}"}


def budget_trainer(clock: BudgetClock | None):
    """The Trainer, with its learning-rate schedule following the time budget when there is a clock."""
    from transformers import Trainer

    class BudgetTrainer(Trainer):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            fresh = self.lr_scheduler is None
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            if clock and fresh:
                follow_budget(scheduler, clock, num_training_steps)
            return scheduler

    return BudgetTrainer


def run_figures(log_history: list[dict]) -> dict:
    """Loss figures of the whole run from the Trainer's log history (restored from the checkpoint after a resume).
    Each logged loss is the mean over the steps since the previous log, so the run's mean weighs it by those steps."""
    rows = [r for r in log_history if "loss" in r]
    if not rows:
        return {"train_loss": None, "first_loss": None, "final_loss": None}
    total = steps = 0.0
    previous = 0
    for r in rows:
        span = max(r["step"] - previous, 1)
        previous = r["step"]
        total += r["loss"] * span
        steps += span
    return {"train_loss": total / steps, "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"]}


def plot_loss(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.is_file() else []
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
    with atomic_write(out, "wb") as handle:  # replaces a link at `out`, never writes through it
        fig.savefig(handle, dpi=120, format="png")
    plt.close(fig)


def train(cfg: TrainConfig) -> dict:
    """Train and return the run's figures (on rank 0; other processes return {} so that one summary is printed)."""
    from transformers import set_seed

    set_seed(cfg.seed)  # before the adapter is initialised, so a run is reproducible from its seed
    if cfg.quiet:
        quiet_libraries()
    # every input first: nothing is written (or removed) before all of them are known good
    model_path = resolve(cfg.model_name_or_path)
    out = Path(cfg.output_dir)
    folders.check_overlap(out, _inputs(cfg, model_path))
    with folders.lock(out) if _world()[0] == 0 else contextlib.nullcontext():  # one training per output_dir
        return _train(cfg, model_path, out)


def _train(cfg: TrainConfig, model_path: Path, out: Path) -> dict:
    """train() once the output folder is this process's: plan, train, put the finished folder in place."""
    import torch
    from transformers import PrinterCallback, TrainingArguments

    work, checkpoint, skipped = folders.plan(out, cfg.resume, cfg.overwrite_output_dir)
    records = load_records(cfg.dataset_dir, cfg.dataset, cfg.max_samples, cfg.seed)
    resolved = {**to_dict(cfg), "model_path": str(model_path.resolve()),
                "dataset_path": str(Path(cfg.dataset_dir).resolve()),
                # what was read, not only where: a file edited in place must not be resumed as the same run
                "records_sha256": records_digest(records), "model_sha256": model_digest(model_path)}
    if checkpoint:
        check_resume_settings(work, resolved)
    tokenizer = load_tokenizer(model_path)
    template = get_template(cfg.template, tokenizer)
    resolved["template_resolved"] = template.name
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

    resume_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    args = TrainingArguments(  # creating it starts torch.distributed under torchrun
        output_dir=str(work), per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a fraction of the real number of steps, which counts the processes
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        seed=cfg.seed, data_seed=cfg.seed, report_to=cfg.report_to, remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length", **parallel_args(cfg), ddp_find_unused_parameters=False,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), logging_first_step=True,
        include_num_input_tokens_seen="non_padding",  # summed over processes, kept in checkpoints
        logging_nan_inf_filter=False,  # a non-finite loss must be seen, not averaged away
        disable_tqdm=True)  # ShowProgress shows the steps: a bar on a terminal, lines in a log
    rank, world = _world()
    if rank == 0:  # every process planned before the process group started, so before this changes anything
        for ckpt in skipped:
            print(f"train: {ckpt} is incomplete (killed while saving?): skipped and removed", file=sys.stderr)
        if checkpoint:
            print(f"train: resuming from {checkpoint}", file=sys.stderr)
        folders.prepare(out, work, cfg.resume, skipped)
        with atomic_write(work / RESOLVED_CONFIG) as handle:  # at the start, so a resume can compare settings
            yaml.safe_dump(resolved, handle, sort_keys=False)
    _barrier()
    collator = Collator(tokenizer.pad_token_id, packing=cfg.packing)
    # one clock for the budget; only a schedule that follows it counts the time of earlier sessions
    clock = (BudgetClock(cfg.max_train_minutes * 60, spent_before(checkpoint) if cfg.schedule_to_budget else 0.0)
             if cfg.max_train_minutes else None)
    trainer_class = budget_trainer(clock if cfg.schedule_to_budget else None)
    callbacks = _callbacks(cfg, work, resume_step, clock)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator,
                            callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # raw log dicts; ShowProgress shows readable progress
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:  # a failed run ends its bar too, so the error line starts a line of its own
        for callback in callbacks:
            getattr(callback, "close_progress", lambda: None)()

    trainer.save_model(str(work))
    state = trainer.state
    runtime = result.metrics.get("train_runtime", 0.0) or 1e-9
    earlier = json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint else {}
    session_tokens = state.num_input_tokens_seen - earlier.get("num_input_tokens_seen", 0)
    final_lr = next((r["learning_rate"] for r in reversed(state.log_history) if "learning_rate" in r), None)
    figures = {**run_figures(state.log_history), "steps": state.global_step, "planned_steps": state.max_steps,
               "final_learning_rate": final_lr, "resumed_from_step": resume_step,
               "records": len(records), "trainable_params": trainable, "processes": world,
               "train_runtime_s": round(runtime, 2), "tokens_seen": state.num_input_tokens_seen,
               "tokens_per_s": round(session_tokens / runtime, 1), **data_figures}
    if trainer.is_world_process_zero():
        if state.global_step < state.max_steps and not cfg.schedule_to_budget:
            print(f"train: the time budget stopped training at step {state.global_step} of {state.max_steps}, "
                  f"before its learning-rate schedule ended (last learning rate {final_lr}; "
                  "--schedule_to_budget ends the schedule with the budget)", file=sys.stderr)
        tokenizer.save_pretrained(work)
        if cfg.plot_loss:
            plot_loss(work / TRAIN_LOG, work / "training_loss.png")
        write_json(work / folders.FINISHED, figures)  # last: a folder without it is unfinished
        folders.finish(out, work)
    _barrier()
    return figures if rank == 0 else {}
