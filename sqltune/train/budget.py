"""The time budget of a training run (--max_train_minutes, --schedule_to_budget) and the few facts about the
processes of a run that every training stage needs (rank, world size, a barrier, rank 0's value for all).

Shared by every `train --stage`: sft.py, dpo.py (and any other) use the same clock, schedule and stop rule.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sqltune.errors import SqltuneError


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


def budget_trainer(clock: BudgetClock | None, base=None):
    """`base` (the transformers Trainer, or a subclass such as TRL's DPOTrainer), with its learning-rate schedule
    following the time budget when there is a clock."""
    if base is None:
        from transformers import Trainer as base

    class BudgetTrainer(base):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            fresh = self.lr_scheduler is None
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            if clock and fresh:
                follow_budget(scheduler, clock, num_training_steps)
            return scheduler

    return BudgetTrainer

