"""What every training stage does around its Trainer, in the order it happens: the inputs the output folder may not
overlap, the work folder and the settings a resume must match (the run's record, sqltune_train.yaml), the
TrainingArguments every stage shares, the start of the work folder, the trainer run, and the end of a run (weights,
tokenizer, loss plot, figures, the finished folder put in place by sqltune/train/folders.py).

A stage (sft.py, dpo.py, grpo.py) brings its own data, model and Trainer class and calls these in turn, so a run of
any stage resumes, keeps its time budget, logs, shows progress and finishes the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from sqltune.config import TrainConfig, parse_yaml, to_dict
from sqltune.data.registry import lookup_many
from sqltune.digest import model_digest, records_digest
from sqltune.errors import SqltuneError
from sqltune.io import atomic_write, write_json
import sqltune.train.folders as folders
from sqltune.train.budget import BudgetClock, _barrier, _world, spent_before
from sqltune.train.callbacks import TRAIN_LOG
from sqltune.train.loss import trl_head_on_labelled_positions
from sqltune.train.setup import parallel_args

RESOLVED_CONFIG = "sqltune_train.yaml"

# how the run is carried out, not what it learns: these may change between a run and its resume
EXECUTION_ONLY = {"resume", "overwrite_output_dir", "output_dir", "max_train_minutes", "logging_steps", "save_steps",
                  "save_total_limit", "plot_loss", "report_to", "quiet", "gradient_checkpointing", "attn_implementation",
                  "model_name_or_path", "dataset_dir", "adapter"}
# (the last three are compared resolved: model_path, dataset_path, adapter_path; and by content, the digests)

# digests of what the run read, said in words (two hashes tell a user nothing)
CONTENT_CHANGED = {"records_sha256": "the training records changed (the dataset was edited in place)",
                   "model_sha256": "the base model folder's files changed",
                   "adapter_sha256": "the starting adapter's files changed"}


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


def run_inputs(cfg: TrainConfig, model_path: Path) -> dict[str, Path]:
    """Everything the run reads; the output folder may not overlap any of them."""
    inputs = {"model folder": model_path, "dataset folder": Path(cfg.dataset_dir)}
    for entry in lookup_many(cfg.dataset_dir, cfg.dataset):
        for key in ("file_name", "pairs"):  # pairs: the preference pairs `sqltune samples` registered beside
            if entry.get(key):
                inputs[f"dataset file {Path(entry[key]).name}"] = Path(entry[key])
    if getattr(cfg, "adapter", ""):
        inputs["starting adapter"] = Path(cfg.adapter)
    if cfg.deepspeed:
        inputs["DeepSpeed config"] = Path(cfg.deepspeed)
    if cfg.fsdp_config:
        inputs["FSDP config"] = Path(cfg.fsdp_config)
    return inputs


def open_run(cfg: TrainConfig, out: Path, model_path: Path, records: list[dict], **read: str
             ) -> tuple[Path, Path | None, list[Path], dict]:
    """(work folder, checkpoint to resume or None, incomplete checkpoints to remove, the resolved settings). The
    resolved settings hold what was read, not only where (`read`: a stage's own, such as a starting adapter's
    digest), and a resumed run's must match its checkpoint's. Writes nothing."""
    work, checkpoint, skipped = folders.plan(out, cfg.resume, cfg.overwrite_output_dir)
    resolved = {**to_dict(cfg), "model_path": str(model_path.resolve()),
                "dataset_path": str(Path(cfg.dataset_dir).resolve()),
                # what was read, not only where: a file edited in place must not be resumed as the same run
                "records_sha256": records_digest(records), "model_sha256": model_digest(model_path), **read}
    if checkpoint:
        check_resume_settings(work, resolved)
    return work, checkpoint, skipped, resolved


def checkpointing(args_class, on: bool) -> dict:
    """The TrainingArguments keyword that switches activation (gradient) checkpointing: `activation_checkpointing`
    where the installed transformers has it (newer 5.x, which warns about the old name), else
    `gradient_checkpointing` (5.19, vLLM's CPU build's pin, has only that). TRL's configs turn it on by default;
    sqltune switches it by --gradient_checkpointing."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_class)} if dataclasses.is_dataclass(args_class) else set()
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def training_arguments(cfg: TrainConfig, work: Path, args_class=None, **extra):
    """The TrainingArguments (or a subclass, such as TRL's DPOConfig) every stage trains with; `extra` adds or
    replaces a stage's own."""
    import torch

    if args_class is None:
        from transformers import TrainingArguments as args_class

    shared = dict(
        output_dir=str(work), per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a fraction of the real number of steps, which counts the processes
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        seed=cfg.seed, data_seed=cfg.seed, report_to=cfg.report_to, remove_unused_columns=False,
        **parallel_args(cfg), ddp_find_unused_parameters=False,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), logging_first_step=True,
        include_num_input_tokens_seen="non_padding",  # summed over processes, kept in checkpoints
        logging_nan_inf_filter=False,  # a non-finite loss must be seen, not averaged away
        disable_tqdm=True)  # ShowProgress shows the steps: a bar on a terminal, lines in a log
    return args_class(**{**shared, **extra})  # creating it starts torch.distributed under torchrun


def start_work(cfg: TrainConfig, out: Path, work: Path, checkpoint: Path | None, skipped: list[Path],
               resolved: dict) -> None:
    """Once the training arguments exist: rank 0 says what it skips and resumes, readies the work folder and writes
    the run's record at the start (so a resume can compare settings). Every process planned before the process
    group started, so before this changes anything."""
    if _world()[0] == 0:
        for ckpt in skipped:
            print(f"train: {ckpt} is incomplete (killed while saving?): skipped and removed", file=sys.stderr)
        if checkpoint:
            print(f"train: resuming from {checkpoint}", file=sys.stderr)
        folders.prepare(out, work, cfg.resume, skipped)
        with atomic_write(work / RESOLVED_CONFIG) as handle:
            yaml.safe_dump(resolved, handle, sort_keys=False)
    _barrier()


def budget_clock(cfg: TrainConfig, checkpoint: Path | None) -> BudgetClock | None:
    """One clock for the budget; only a schedule that follows it counts the time of earlier sessions."""
    if not cfg.max_train_minutes:
        return None
    return BudgetClock(cfg.max_train_minutes * 60, spent_before(checkpoint) if cfg.schedule_to_budget else 0.0)


def run_trainer(trainer, callbacks: list, checkpoint: Path | None):
    """trainer.train(), resumed from `checkpoint`, with the Trainer's raw log printer off (ShowProgress shows
    readable progress); a failed run ends its bar too, so the error line starts a line of its own."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    try:
        with trl_head_on_labelled_positions():  # DPO and GRPO: the prompt's positions skip the output layer on a CPU
            return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        for callback in callbacks:
            getattr(callback, "close_progress", lambda: None)()


def finish_run(cfg: TrainConfig, trainer, result, checkpoint: Path | None, work: Path, out: Path, tokenizer,
               figures: dict) -> dict:
    """Save the weights (every process: DeepSpeed and FSDP gather them), then on rank 0 the tokenizer, the loss plot
    and the figures (last: a folder without them is unfinished), and put the finished folder in place. Returns the
    run's figures on rank 0 ({} on the others, so that one summary is printed): those of the whole run (also after a
    resume and over all processes), with the stage's own `figures` among them."""
    trainer.save_model(str(work))
    state = trainer.state
    runtime = result.metrics.get("train_runtime", 0.0) or 1e-9
    earlier = json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint else {}
    session_tokens = state.num_input_tokens_seen - earlier.get("num_input_tokens_seen", 0)
    final_lr = next((r["learning_rate"] for r in reversed(state.log_history) if "learning_rate" in r), None)
    rank, world = _world()
    figures = {**run_figures(state.log_history), "steps": state.global_step, "planned_steps": state.max_steps,
               "final_learning_rate": final_lr,
               "resumed_from_step": int(checkpoint.name.split("-")[-1]) if checkpoint else 0, **figures,
               "processes": world, "train_runtime_s": round(runtime, 2), "tokens_seen": state.num_input_tokens_seen,
               "tokens_per_s": round(session_tokens / runtime, 1)}
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


def plot_log(log_path: Path, out: Path, draw) -> None:
    """A curve of the training log as a PNG file, drawn by the run page's own plot (`draw`, from
    sqltune/report/plots.py), so the file and the page show the same picture; nothing when the log holds none."""
    from sqltune.report.page import log_rows

    png = draw(log_rows(log_path) if log_path.is_file() else [])
    if png is None:
        return
    with atomic_write(out, "wb") as handle:  # replaces a link at `out`, never writes through it
        handle.write(png)


def plot_loss(log_path: Path, out: Path) -> None:
    """training_loss.png: the loss per logged step."""
    from sqltune.report.plots import training_loss

    plot_log(log_path, out, training_loss)
