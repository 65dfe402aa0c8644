"""The stages, in pipeline order: name, one-line summary, config class and the function that runs it.

The CLI and `sqltune run` both read this table, so the pipeline's dependencies are plain imports a reader can follow.
Each function imports its stage module when called, so `sqltune --help` and `sqltune evaluate` never load torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sqltune.config import EvalConfig, MergeConfig, PredictConfig, PrepareConfig, SamplesConfig, TrainConfig


def run_prepare(cfg: PrepareConfig) -> dict:
    from sqltune.data.prepare import prepare

    return prepare(cfg)


def run_train(cfg: TrainConfig) -> dict:
    from sqltune.train.dispatch import train  # --stage sft|dpo|grpo

    return train(cfg)


def run_merge(cfg: MergeConfig) -> dict:
    from sqltune.infer.merge import merge

    return merge(cfg)


def run_predict(cfg: PredictConfig) -> dict:
    from sqltune.infer.predict import predict

    return predict(cfg)


def run_samples(cfg: SamplesConfig) -> dict:
    from sqltune.samples import samples

    return samples(cfg)


def run_evaluate(cfg: EvalConfig) -> dict:
    from sqltune.eval.evaluate import evaluate

    return evaluate(cfg)


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    config: type
    run: Callable[..., dict]


STAGES = {s.name: s for s in (
    Stage("prepare", "turn a Spider/BIRD/SParC/CoSQL folder into supervised records", PrepareConfig, run_prepare),
    Stage("train", "fine-tune a model (LoRA, QLoRA, freeze, full) on prepared records", TrainConfig, run_train),
    Stage("merge", "fold a LoRA adapter into a plain model folder", MergeConfig, run_merge),
    Stage("predict", "write one SQL per prepared record, batched and resumable", PredictConfig, run_predict),
    Stage("evaluate", "Spider/BIRD execution and exact-match accuracy per hardness", EvalConfig, run_evaluate),
)}
ORDER = tuple(STAGES)
# A recipe's `steps:` may also run `samples` (its own command in the CLI, not one of the five sections of `stages:`).
STEP_STAGES = {**STAGES, "samples": Stage("samples", "turn predict's sampled candidates on a train split into "
                                          "records and preference pairs", SamplesConfig, run_samples)}


def call(name: str, cfg=None, options: dict | None = None) -> dict:
    """Run stage `name` from the Python API: its config object, keyword options with the flags' names, or both
    (the options replace the config's values); unknown names are one line with a hint."""
    import dataclasses

    from sqltune.config import build

    stage = STAGES[name]
    if cfg is None:
        cfg = build(stage.config, options or {}, where=f"sqltune.{name}()")
    elif options:
        cfg = build(stage.config, {**dataclasses.asdict(cfg), **options}, where=f"sqltune.{name}()")
    return stage.run(cfg)
