"""`train --stage dpo`: direct preference optimisation with TRL's DPOTrainer on the pairs `sqltune samples` made
(a right and a wrong SQL answer of one prompt, scored with EX's rules).

The run is SFT's run (sqltune/train/session.py): the same input checks, output folder, lock, resume record and checks,
time budget, callbacks (log, finite loss, first gradients, progress) and finish; what differs is here:

- data: the pairs tokenised with our chat template (sqltune/train/pairs.py), prompt and answer end exactly as in SFT.
  TRL's own dataset preparation (its chat template, an eos appended to each answer, its truncation) is skipped: the
  dataset comes tokenised, and `max_length` is off because prompts and answers are already cut as SFT cuts them;
- model and reference: with LoRA/QLoRA and no --adapter, a fresh adapter is trained on the model (a merged SFT model,
  or a base), and the reference is the model with the adapter disabled, so no second copy is loaded. With
  --adapter (an SFT adapter of the model), that adapter goes on training and TRL keeps a frozen copy of it as the
  reference; the copy is dropped before saving, so the output is one adapter for the base, like SFT's, which merge,
  predict and serve read as they are. With full or freeze fine-tuning TRL loads the model a second time as the
  reference;
- loss: TRL's (--pref_loss, --dpo_beta); the figures add the last logged reward accuracy and margin.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from sqltune.config import TrainConfig
from sqltune.errors import SqltuneError
from sqltune.loading import check_adapter, load_tokenizer, resolve
from sqltune.progress import quiet_libraries
from sqltune.templates import get_template
import sqltune.train.folders as folders
from sqltune.train.budget import _world, budget_trainer
from sqltune.train.callbacks import make_callbacks
from sqltune.train.pairs import load_pairs, tokenize_pairs
from sqltune.train.session import (budget_clock, checkpointing, finish_run, open_run, run_inputs, run_trainer,
                                   start_work, training_arguments)
from sqltune.train.setup import adapter_read, load_prepared, load_with_adapter, lora_config, setup_trainable

REFERENCE = "ref"  # the adapter TRL copies from a starting adapter as the reference


def train_dpo(cfg: TrainConfig) -> dict:
    """Train on preference pairs and return the run's figures (on rank 0; {} on the other processes)."""
    from transformers import set_seed

    set_seed(cfg.seed)  # before an adapter is initialised, so a run is reproducible from its seed
    if cfg.quiet:
        quiet_libraries()
    model_path = resolve(cfg.model_name_or_path)
    adapter = check_adapter(cfg.adapter) if cfg.adapter else None
    out = Path(cfg.output_dir)
    folders.check_overlap(out, run_inputs(cfg, model_path))
    load_pairs(cfg.dataset_dir, cfg.dataset)  # a dataset without pairs is one line before the output is touched
    with folders.lock(out) if _world()[0] == 0 else contextlib.nullcontext():  # one training per output_dir
        return _train(cfg, model_path, out, adapter)


def _train(cfg: TrainConfig, model_path: Path, out: Path, adapter: Path | None) -> dict:
    from trl import DPOConfig

    pairs = load_pairs(cfg.dataset_dir, cfg.dataset, cfg.max_samples, cfg.seed)
    work, checkpoint, skipped, resolved = open_run(cfg, out, model_path, pairs, **adapter_read(adapter))
    tokenizer = load_tokenizer(model_path)
    template = get_template(cfg.template, tokenizer)
    resolved["template_resolved"] = template.name
    dataset, data_figures = tokenize_pairs(pairs, tokenizer, template, cfg.max_source_length, cfg.max_target_length)
    model, peft_config = policy(cfg, model_path, adapter)

    args = training_arguments(cfg, work, DPOConfig, beta=cfg.dpo_beta, loss_type=[cfg.pref_loss], max_length=None,
                              **checkpointing(DPOConfig, cfg.gradient_checkpointing), precompute_ref_log_probs=False)
    start_work(cfg, out, work, checkpoint, skipped, resolved)
    clock = budget_clock(cfg, checkpoint)
    resume_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    callbacks = make_callbacks(cfg, work, resume_step, clock)
    trainer_class = budget_trainer(clock if cfg.schedule_to_budget else None, pretokenized_dpo_trainer())
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=callbacks)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if trainable == 0:
        raise SqltuneError("no parameter is trainable with these settings")
    result = run_trainer(trainer, callbacks, checkpoint)
    drop_reference(trainer)
    return finish_run(cfg, trainer, result, checkpoint, work, out, tokenizer,
                      {"pairs": len(pairs), "trainable_params": trainable, **data_figures,
                       **reward_figures(trainer.state.log_history)})


def policy(cfg: TrainConfig, model_path: Path, adapter: Path | None):
    """(model, peft_config for TRL or None): the model to train as the finetuning type says, see the module's doc."""
    if adapter is not None:
        return load_with_adapter(cfg, model_path, adapter), None
    model = load_prepared(cfg, model_path)
    if cfg.finetuning_type in ("lora", "qlora"):
        return model, lora_config(model, cfg)  # TRL wraps it; the reference is the model with the adapter off
    return setup_trainable(model, cfg), None


def pretokenized_dpo_trainer():
    """TRL's DPOTrainer for a dataset that is tokenised already (prompt_ids, chosen_ids, rejected_ids): its own
    preparation would render the prompt with its template and append an eos to every answer."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def drop_reference(trainer) -> None:
    """Remove the frozen copy TRL made of a starting adapter, so only the trained adapter is saved."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE)


def reward_figures(log_history: list[dict]) -> dict:
    """The last logged reward accuracy (pairs whose chosen answer the model prefers over the reference's margin) and
    mean reward margin."""
    last = next((r for r in reversed(log_history) if "rewards/accuracies" in r), {})
    return {"reward_accuracy": last.get("rewards/accuracies"), "reward_margin": last.get("rewards/margins")}
