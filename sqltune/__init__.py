"""sqltune: turn an open causal LLM into a Text-to-SQL model.

Stages (each one function taking one typed config, or keyword arguments with the config's field names, and
returning its figures): prepare -> train -> merge -> predict -> evaluate, and `run`, which chains them from one
YAML recipe.

    from sqltune import prepare, train, predict, evaluate
    prepare(source="demo", out="data")
    train(model_name_or_path="smollm2-135m-instruct", dataset="demo_train", dataset_dir="data", output_dir="out")
"""

from __future__ import annotations

from sqltune.config import EvalConfig, MergeConfig, PredictConfig, PrepareConfig, TrainConfig

__version__ = "0.1.0"
__all__ = ["prepare", "train", "merge", "predict", "evaluate", "run", "PrepareConfig", "TrainConfig",
           "MergeConfig", "PredictConfig", "EvalConfig"]


def _call(name: str, cfg, options: dict) -> dict:
    from sqltune.stages import call

    return call(name, cfg, options)


def prepare(cfg: PrepareConfig | None = None, **options) -> dict:
    """Spider/BIRD/SParC/CoSQL folder -> supervised records, gold files and registry entries."""
    return _call("prepare", cfg, options)


def train(cfg: TrainConfig | None = None, **options) -> dict:
    """Fine-tune (LoRA, QLoRA, freeze, full) on prepared records; returns the training figures."""
    return _call("train", cfg, options)


def merge(cfg: MergeConfig | None = None, **options) -> dict:
    """Fold a LoRA adapter into a plain model folder."""
    return _call("merge", cfg, options)


def predict(cfg: PredictConfig | None = None, **options) -> dict:
    """One SQL per prepared record, batched and resumable."""
    return _call("predict", cfg, options)


def evaluate(cfg: EvalConfig | None = None, **options) -> dict:
    """Execution and exact-match accuracy of a prediction file against a gold file."""
    return _call("evaluate", cfg, options)


def run(recipe: str, force: bool = False, new: bool = False, run_dir: str | None = None,
        runs_dir: str | None = None, **overrides) -> dict:
    """Every stage of a YAML recipe in one run folder (continuing an unfinished run); each stage's figures.
    Overrides use the command line's dotted names as keys: `run("r.yaml", **{"train.max_steps": 2})`."""
    from sqltune.pipeline import run_recipe

    return run_recipe(recipe, force=force, new=new, run_dir=run_dir, root=runs_dir, overrides=overrides)

