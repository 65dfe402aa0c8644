"""What a GRPO run's rewards did over its steps (issue 28's goal: "mean reward rises over the steps"), from its log.

A GRPO step scores a few train prompts, so one step's mean mostly says how hard its prompts were. Rising means
something only where the same prompts come back: over epochs. This prints every logged step (reward mean and
spread, the share of groups whose completions all scored alike, the share of completions that matched the gold, ran
with another result, or failed, and the step's seconds), then the mean reward of each epoch and of the first and
second half of the steps.

    python benchmarks/grpo_rewards.py RUN/grpo/trainer_log.jsonl

Reads the log only; times nothing (step seconds are the Trainer's own).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import read_jsonl

COLUMNS = (("reward", "mean_reward"), ("reward_std", "reward_std"),
           ("frac_reward_zero_std", "groups_with_equal_rewards"), ("sql/match", "match"), ("sql/runs", "runs"),
           ("sql/fails", "fails"), ("step_time", "step_s"))


def steps(log: Path) -> list[dict]:
    """The log's rows that carry a reward (the last row is the run's summary: no reward), by step."""
    return sorted((r for r in read_jsonl(log) if "reward" in r), key=lambda r: r["step"])


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summary(rows: list[dict]) -> list[str]:
    """Mean reward per epoch (the epoch a step ends in; its prompts are the same each epoch) and per half."""
    out, by_epoch = [], {}
    for r in rows:
        by_epoch.setdefault(max(math.ceil(r["epoch"] - 1e-9), 1), []).append(r["reward"])
    for epoch, rewards in sorted(by_epoch.items()):
        out.append(f"epoch {epoch}: steps {len(rewards):3d}  mean reward {mean(rewards):.3f}")
    half = len(rows) // 2
    out.append(f"steps 1-{half} / {half + 1}-{len(rows)}: mean reward {mean([r['reward'] for r in rows[:half]]):.3f}"
               f" / {mean([r['reward'] for r in rows[half:]]):.3f}")
    out.append(f"groups whose completions scored alike, mean over steps: "
               f"{mean([r.get('frac_reward_zero_std', math.nan) for r in rows]):.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="a GRPO run's trainer_log.jsonl")
    log = parser.parse_args(argv).log
    try:
        rows = steps(log)
    except SqltuneError as exc:  # no such file, or a line that is not JSON
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {log} has no step with a reward (not a GRPO log?)", file=sys.stderr)
        return 2
    print("step  " + "  ".join(name for _, name in COLUMNS))
    for r in rows:
        print(f"{r['step']:4d}  " + "  ".join(f"{r.get(key, math.nan):>{len(name)}.3f}" for key, name in COLUMNS))
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
