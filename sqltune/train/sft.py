"""The train stage: supervised fine-tuning on prepared records with the transformers Trainer.

Read top to bottom: check every input (model, dataset, output folder against the inputs, settings of a resumed
run), tokenise the records with the chat template (loss on answer tokens only), set up the trainable parameters for
the finetuning type (or load --adapter, a LoRA adapter that goes on learning), train in the work folder with batches
of examples sharing their prompt's start (one database's schema, run once per batch) or else of similar length, then
save the adapter (or model), tokenizer, log and loss plot and put the finished folder in place
(sqltune/train/folders.py: the old output is replaced only by a complete new one). The figures describe the whole
run, also after a resume and over all processes.

Several processes: launch the same command with `torchrun --nproc_per_node N -m sqltune train ...` or
`accelerate launch -m sqltune train ...`; the Trainer does the rest (gloo on CPU, NCCL on GPUs). A DeepSpeed or
FSDP config is passed through (`--deepspeed ds.json`, or an Accelerate config file).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from sqltune.config import TrainConfig
from sqltune.loading import check_adapter, load_tokenizer, resolve
from sqltune.progress import quiet_libraries
from sqltune.templates import get_template
import sqltune.train.folders as folders
from sqltune.train.budget import BudgetClock, _world, budget_trainer, from_rank0  # noqa: F401 (re-exported)
from sqltune.train.callbacks import TRAIN_LOG, make_callbacks as _callbacks  # noqa: F401 (TRAIN_LOG re-exported)
from sqltune.train.data import Collator, load_records, tokenize_records
from sqltune.train.loss import install_label_only_loss
from sqltune.train.session import (RESOLVED_CONFIG, budget_clock, finish_run, open_run, run_inputs,  # noqa: F401
                                   run_trainer, start_work, training_arguments)
from sqltune.train.setup import adapter_read, trainable_model
from sqltune.train.shared_prefix import (group_prefix_lengths, grouped_sampler, prefix_grouped, prefix_key,
                                        prompt_sharing)


def train(cfg: TrainConfig) -> dict:
    """Train and return the run's figures (on rank 0; other processes return {} so that one summary is printed)."""
    from transformers import set_seed

    set_seed(cfg.seed)  # before the adapter is initialised, so a run is reproducible from its seed
    if cfg.quiet:
        quiet_libraries()
    # every input first: nothing is written (or removed) before all of them are known good
    model_path = resolve(cfg.model_name_or_path)
    adapter = check_adapter(cfg.adapter) if cfg.adapter else None
    out = Path(cfg.output_dir)
    folders.check_overlap(out, run_inputs(cfg, model_path))
    with folders.lock(out) if _world()[0] == 0 else contextlib.nullcontext():  # one training per output_dir
        return _train(cfg, model_path, out, adapter)


def _train(cfg: TrainConfig, model_path: Path, out: Path, adapter: Path | None = None) -> dict:
    """train() once the output folder is this process's: plan, train, put the finished folder in place."""
    records = load_records(cfg.dataset_dir, cfg.dataset, cfg.max_samples, cfg.seed)
    work, checkpoint, skipped, resolved = open_run(cfg, out, model_path, records, **adapter_read(adapter))
    tokenizer = load_tokenizer(model_path)
    template = get_template(cfg.template, tokenizer)
    resolved["template_resolved"] = template.name
    dataset, data_figures = tokenize_records(records, tokenizer, template, cfg.max_source_length,
                                             cfg.max_target_length)
    # --adapter: that LoRA adapter goes on learning (its own rank and targets), e.g. SFT's on its right samples
    model, trainable = trainable_model(cfg, model_path, adapter)
    share = prompt_sharing(cfg)
    # no full-vocabulary logits (sqltune/train/loss.py); a batch's common prompt once (sqltune/train/shared_prefix.py)
    data_figures["loss_kernel"] = install_label_only_loss(model, share_prefix=share)

    args = training_arguments(cfg, work, train_sampling_strategy="group_by_length" if cfg.group_by_length
                              else "random", length_column_name="length")
    start_work(cfg, out, work, checkpoint, skipped, resolved)
    clock = budget_clock(cfg, checkpoint)
    trainer_class = budget_trainer(clock if cfg.schedule_to_budget else None)
    if share:
        groups, lengths = [prefix_key(r) for r in records], dataset["length"]
        common = group_prefix_lengths(groups, dataset["input_ids"])
        trainer_class = prefix_grouped(trainer_class, groups, lengths, common)
        data_figures["shared_prompt_batches"] = grouped_sampler(
            groups, lengths, cfg.per_device_train_batch_size, cfg.seed, args.world_size, common).shared_batches()
    resume_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    callbacks = _callbacks(cfg, work, resume_step, clock)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset,
                            data_collator=Collator(tokenizer.pad_token_id, packing=cfg.packing), callbacks=callbacks)
    result = run_trainer(trainer, callbacks, checkpoint)
    return finish_run(cfg, trainer, result, checkpoint, work, out, tokenizer,
                      {"records": len(records), "trainable_params": trainable, **data_figures})
