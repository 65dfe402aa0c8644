"""The Trainer callbacks of every training stage: the JSONL log, the finite-loss and first-gradient checks, the
per-rank weight digest, the time budget, the logging rule, freed memory handed back on request (sqltune/train/host_memory.py)
and the progress display (sqltune/progress.py).

Built by `make_callbacks` for sft.py, dpo.py and grpo.py alike, so a run of any stage logs, stops and shows
progress the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from sqltune.config import TrainConfig
from sqltune.errors import SqltuneError
from sqltune.io import append_once, atomic_write, refuse_link
from sqltune.progress import Progress
from sqltune.train.budget import BudgetClock, _world
from sqltune.train.host_memory import ReturnFreedMemory, resident_mb
from sqltune.train.setup import gradient_check

TRAIN_LOG = "trainer_log.jsonl"


def make_callbacks(cfg: TrainConfig, work: Path, resume_step: int, clock: BudgetClock | None, figures=None):
    """The callbacks of a run, in order; `figures(logs, tokens_per_s)` gives what the progress display shows after a
    logged step (default progress_figures: loss, learning rate, tokens/s; GRPO shows its reward)."""
    budget = [BudgetSchedule(clock)] if clock else []  # before StepControl, which logs the step it stops at
    trim = [ReturnFreedMemory(cfg.trim_host_memory_every)] if cfg.trim_host_memory_every else []
    # ShowProgress last: it reads whether StepControl made this step log
    return [JsonlLog(work / TRAIN_LOG, resume_step), FiniteLoss(cfg.learning_rate), GradientCheck(), RankDigest(work),
            *budget, StepControl(), *trim, ShowProgress(cfg.quiet, figures or progress_figures)]


class JsonlLog(TrainerCallback):
    """Appends each logged step to trainer_log.jsonl (a resumed run first drops the lines after its checkpoint),
    never through a symbolic link (one line instead)."""

    def __init__(self, log_path: Path, resume_step: int):
        self.log_path, self.resume_step = log_path, resume_step

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        refuse_link(self.log_path, "the training log")  # a resume would read its target and copy it in
        if self.log_path.is_file():
            keep = [x for x in self.log_path.read_text().splitlines() if x.strip() and
                    json.loads(x).get("step", 0) <= self.resume_step]
            with atomic_write(self.log_path) as handle:
                handle.write("".join(k + "\n" for k in keep))

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **{k: v for k, v in logs.items()
                                                                     if isinstance(v, (int, float))}}
        row["tokens_seen"] = state.num_input_tokens_seen  # every process, the whole run
        rss = resident_mb()
        if rss is not None:
            row["rss_mb"] = rss  # this process's resident memory, so a run's growth shows in its log
        append_once(self.log_path, json.dumps(row) + "\n")  # never through a link planted at the log's place


class FiniteLoss(TrainerCallback):
    """A NaN or infinite loss stops training with one line (the logged loss is averaged over all processes, so
    every process stops together)."""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise SqltuneError(f"training stopped at step {state.global_step}: the loss is {loss} "
                               f"(learning rate {self.learning_rate}: try a lower --learning_rate)")


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

    def __init__(self, work: Path):
        self.work = work

    def on_train_end(self, args, state, control, model=None, **kw):
        rank, world = _world()
        if world > 1 and model is not None:
            h = hashlib.sha256()
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    h.update(name.encode())
                    h.update(p.detach().float().cpu().numpy().tobytes())
            self.work.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.work / f"rank{rank}_weights.sha256") as handle:  # replaces a link, never follows
                handle.write(h.hexdigest() + "\n")


class BudgetSchedule(TrainerCallback, ExportableState):
    """With --max_train_minutes: reads the budget clock after each optimizer step (before the schedule moves,
    which follows it with --schedule_to_budget), stops once the budget is spent (the final save still happens),
    and saves the seconds spent in each checkpoint for a resume (its class name is the checkpoint's key:
    budget.spent_before reads it)."""

    def __init__(self, clock: BudgetClock):
        self.clock = clock

    def on_train_begin(self, args, state, control, **kw):
        self.clock.start()

    def on_optimizer_step(self, args, state, control, **kw):
        self.clock.tick()

    def on_step_end(self, args, state, control, **kw):
        if self.clock.fraction >= 1:
            control.should_training_stop = True
        return control

    def state(self) -> dict:
        return {"args": {}, "attributes": {"spent_s": self.clock.spent_s()}}


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

    def __init__(self, quiet: bool, figures):
        self.quiet, self.figures = quiet, figures

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.bar = Progress(state.max_steps, "train", "step", quiet=self.quiet, summary=True,
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
        self.bar.postfix(**self.figures(logs, rate))
        self.bar.advance_to(state.global_step)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.advance_to(state.global_step)  # a last step whose log showed no loss
        self.close_progress()

    def close_progress(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_figures(logs: dict, tokens_per_s: float) -> dict:
    """The figures shown after the progress counts: the last logged loss, learning rate and tokens/s."""
    return {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0.0):.3g}",
            "tokens/s": f"{tokens_per_s:.0f}"}

