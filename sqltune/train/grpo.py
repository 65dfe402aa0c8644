"""The grpo training stage (`train --stage grpo`): TRL's GRPOTrainer, rewarded by executing each sampled SQL.

For each prompt (encoded as predict encodes it, sqltune/train/grpo_data.py) the policy samples --num_generations
completions of at most --max_completion_length tokens at --grpo_temperature, stopping on the template's end of an
answer as predict does; the reward (sqltune/train/reward.py) reads each completion's SQL as predict does and runs it in the
sandbox against the gold: 1.0 when EX would score it right, 0.1 when it runs, 0 when it fails (--reward_shape). TRL
turns the rewards of a prompt's group into advantages; by default with no KL term (--grpo_beta 0: no reference model
is kept) and the DAPO loss (token-level, normalised over the batch's tokens). Rollouts come from vLLM (TRL's
colocated engine) when it imports and a GPU is there, else from transformers' generate (--rollout_backend).

Everything around the trainer is the other stages' (sqltune/train/session.py, callbacks.py, budget.py): the output
folder and its lock, resume (the settings, GRPO's included, must match), the time budget, trainer_log.jsonl (which
gets the reward's mean and spread at every step: GRPO logs each step), progress (the bar shows the reward) and the
finished folder. With --plot_loss, training_reward.png shows the reward's mean and spread per step.

It starts from the SFT model either merged into a plain folder (`sqltune merge`; a fresh LoRA is trained on it and
applied to that model by predict) or as its adapter (--adapter: that adapter goes on learning, and the output is one
adapter for the base, as SFT's is). With --adapter there is no reference to keep, so --grpo_beta must stay 0: a
reference would be the base without the SFT adapter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from pathlib import Path

from sqltune.config import TrainConfig
from sqltune.errors import SqltuneError
from sqltune.loading import check_adapter, load_tokenizer, resolve
from sqltune.progress import quiet_libraries
from sqltune.templates import get_template, stop_token_ids
import sqltune.train.folders as folders
from sqltune.train.budget import _world, budget_trainer
from sqltune.train.callbacks import TRAIN_LOG, make_callbacks
from sqltune.train.data import load_records
from sqltune.train.grpo_data import databases, prompt_rows
from sqltune.train.reward import SqlReward
from sqltune.train.session import (budget_clock, checkpointing, finish_run, open_run, plot_log, run_inputs,
                                   run_trainer, start_work, training_arguments)
from sqltune.train.setup import adapter_read, trainable_model


def rollout_backend(choice: str, vllm_found: bool | None = None, gpu: bool | None = None) -> str:
    """`hf` or `vllm` for --rollout_backend auto|hf|vllm: auto takes vLLM when it imports and a CUDA GPU is there
    (TRL runs it beside training on the same GPU); asking for vllm without either is one line."""
    if choice == "hf":
        return "hf"
    if vllm_found is None:
        vllm_found = importlib.util.find_spec("vllm") is not None
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if choice == "vllm" and not vllm_found:
        raise SqltuneError("--rollout_backend vllm: vLLM does not import in this environment (install vllm, or "
                           "use --rollout_backend hf)")
    if choice == "vllm" and not gpu:
        raise SqltuneError("--rollout_backend vllm needs a CUDA GPU (TRL runs vLLM beside training on the same GPU); "
                           "use --rollout_backend hf here")
    return "vllm" if vllm_found and gpu else "hf"


def grpo_trainer_class(prompt_ids: dict[str, list[int]]):
    """TRL's GRPOTrainer, generating from sqltune's prompt ids (looked up by the prompt text) instead of
    re-tokenising the text (TRL would add the tokenizer's special tokens, which chat renders already hold)."""
    from trl import GRPOTrainer

    if not callable(getattr(GRPOTrainer, "_tokenize_prompts", None)):
        import trl

        raise SqltuneError(f"--stage grpo needs a TRL whose GRPOTrainer tokenises prompts in _tokenize_prompts "
                           f"(1.x); this is trl {trl.__version__}")

    class SqltuneGRPOTrainer(GRPOTrainer):
        def _tokenize_prompts(self, prompts: list):
            return [list(prompt_ids[p]) for p in prompts], None, {}

    return SqltuneGRPOTrainer


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def reward_figures(log_history: list[dict]) -> dict:
    """The reward over the whole run (the Trainer's log history, restored from the checkpoint after a resume): the
    first, last and mean of the per-step means, the means of the first and second half of the steps (the goal: it
    rises), and the share of completions per outcome (match, runs, fails, no SQL, gold failed)."""
    def series(key: str) -> list[float]:
        return [r[key] for r in log_history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    rewards = series("reward")
    half = len(rewards) // 2
    figures = {"first_reward": rewards[0] if rewards else None, "final_reward": rewards[-1] if rewards else None,
               "mean_reward": _mean(rewards), "reward_first_half": _mean(rewards[:half]) if half else None,
               "reward_second_half": _mean(rewards[half:]) if half else None}
    for name in ("match", "runs", "fails", "no_sql", "gold_failed"):
        figures[f"{name}_rate"] = _mean(series(f"sql/{name}"))
    return figures


def progress_figures(logs: dict, tokens_per_s: float) -> dict:
    """What the progress display shows after a GRPO step: the reward's mean and spread, the loss, the rate."""
    return {"reward": f"{logs.get('reward', float('nan')):.3f}±{logs.get('reward_std', float('nan')):.3f}",
            "loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0.0):.3g}"}


def plot_reward(log_path: Path, out: Path) -> None:
    """training_reward.png: the mean reward per step, shaded one standard deviation either side."""
    from sqltune.report.plots import reward_curve

    plot_log(log_path, out, reward_curve)


def train_grpo(cfg: TrainConfig) -> dict:
    """Train with GRPO and return the run's figures (on rank 0; other processes return {})."""
    from transformers import set_seed

    set_seed(cfg.seed)
    if cfg.quiet:
        quiet_libraries()
    model_path = resolve(cfg.model_name_or_path)
    out = Path(cfg.output_dir)
    folders.check_overlap(out, run_inputs(cfg, model_path))
    records = load_records(cfg.dataset_dir, cfg.dataset, cfg.max_samples, cfg.seed)
    dbs, bird = databases(cfg.dataset_dir, cfg.dataset, records)
    folders.check_overlap(out, {f"database {p.parent.name}": p.parent for p in sorted(set(dbs))})
    backend = rollout_backend(cfg.rollout_backend)
    adapter = check_adapter(cfg.adapter) if cfg.adapter else None
    with folders.lock(out) if _world()[0] == 0 else contextlib.nullcontext():  # one training per output_dir
        return _train(cfg, model_path, out, records, dbs, bird, backend, adapter)


def _train(cfg: TrainConfig, model_path: Path, out: Path, records: list[dict], dbs: list[Path], bird: bool,
           backend: str, adapter: Path | None) -> dict:
    from trl import GRPOConfig

    work, checkpoint, skipped, resolved = open_run(cfg, out, model_path, records, **adapter_read(adapter))
    tokenizer = load_tokenizer(model_path)
    template = get_template(cfg.template, tokenizer)
    resolved["template_resolved"] = template.name
    rows, prompt_ids, prompts_cut = prompt_rows(records, dbs, tokenizer, template, cfg.max_source_length)
    model, trainable = trainable_model(cfg, model_path, adapter)  # a fresh LoRA, or the starting adapter going on
    stops = stop_token_ids(tokenizer, template, model.generation_config)
    model.generation_config.eos_token_id = stops  # TRL stops and masks completions at these, as predict stops
    vllm = backend == "vllm"
    args = training_arguments(
        cfg, work, GRPOConfig, logging_steps=1,  # the reward's mean and spread at every step
        include_num_input_tokens_seen="no",  # GRPO counts prompt and completion tokens itself
        **checkpointing(GRPOConfig, cfg.gradient_checkpointing),  # TRL turns it on by default; sqltune by the flag
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.grpo_temperature, beta=cfg.grpo_beta, loss_type=cfg.grpo_loss_type, log_completions=False,
        use_vllm=vllm, vllm_mode="colocate", vllm_max_model_length=cfg.max_source_length + cfg.max_completion_length,
        generation_kwargs={"stop_token_ids": stops} if vllm else None)
    start_work(cfg, out, work, checkpoint, skipped, resolved)
    from datasets import Dataset

    reward = SqlReward(cfg.reward_shape, end=template.end_marker(tokenizer), timeout=cfg.reward_timeout, bird=bird,
                       workers=max(1, (os.cpu_count() or 1) // _world()[1]))  # the cores shared by the processes
    try:
        clock = budget_clock(cfg, checkpoint)
        trainer_class = budget_trainer(clock if cfg.schedule_to_budget else None, grpo_trainer_class(prompt_ids))
        callbacks = make_callbacks(cfg, work, int(checkpoint.name.split("-")[-1]) if checkpoint else 0, clock,
                                   figures=progress_figures)
        trainer = trainer_class(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_dict(rows),
                                processing_class=tokenizer, callbacks=callbacks)
        result = run_trainer(trainer, callbacks, checkpoint)
    finally:
        reward.close()
    if trainer.is_world_process_zero() and cfg.plot_loss:  # before the folder is finished, like the loss plot
        plot_reward(work / TRAIN_LOG, work / "training_reward.png")
    figures = {**reward_figures(trainer.state.log_history), "records": len(records), "trainable_params": trainable,
               "prompts_cut": prompts_cut, "num_generations": cfg.num_generations, "rollout_backend": backend}
    return finish_run(cfg, trainer, result, checkpoint, work, out, tokenizer, figures)
