"""Settings of `sqltune train` (its three stages, sft, dpo and grpo, and what each checks), apart from settings.py,
which holds the other stages' settings and the helpers every settings module shares."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from sqltune.config.settings import TEMPLATES, _check, arg, shown

FINETUNING_TYPES = ("lora", "qlora", "freeze", "full")
TRAIN_STAGES = ("sft", "dpo", "grpo")
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "apo_zero", "apo_down")  # TRL's DPOConfig.loss_type names offered
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")  # TRL's GRPOConfig.loss_type names, no more needed
REWARD_OUTCOMES = ("match", "runs", "fails", "no_sql")  # --reward_shape's values, in order
GRPO_SETTINGS = ("num_generations", "max_completion_length", "grpo_temperature", "grpo_beta", "grpo_loss_type",
                 "reward_shape", "reward_timeout", "rollout_backend")


def reward_shape_values(text: str) -> dict[str, float]:
    """--reward_shape `MATCH,RUNS,FAILS[,NO_SQL]` -> {outcome: reward}; NO_SQL defaults to the FAILS value."""
    try:
        values = [float(p) for p in str(text).split(",")]
    except ValueError:
        values = []
    _check(len(values) in (3, 4) and all(math.isfinite(v) for v in values),
           f"--reward_shape must be 3 or 4 numbers MATCH,RUNS,FAILS[,NO_SQL] (e.g. 1.0,0.1,0), not {shown(text)}")
    return dict(zip(REWARD_OUTCOMES, values + values[2:3] * (4 - len(values))))


@dataclass
class TrainConfig:
    stage: str = arg("sft", "what the run learns from: sft (supervised, the records' answers), dpo (preference "
                            "pairs of right and wrong candidates) or grpo (rewards from executing sampled SQL)")
    model_name_or_path: str = arg("", "base model folder, or a catalog name (see `sqltune models list`)")
    adapter: str = arg("", "a LoRA adapter of --model_name_or_path (SFT's, say) to go on training (its own rank "
                           "and targets are kept): sft learns more records with it (right samples, say), dpo keeps its "
                           "frozen copy as the reference model, grpo needs --grpo_beta 0; without it a fresh LoRA is "
                           "trained on the model (a merged SFT model, say), the model itself dpo's reference")
    dpo_beta: float = arg(0.1, "dpo: how far the model may move from the reference (TRL's beta; higher stays "
                               "closer)")
    pref_loss: str = arg("sigmoid", f"dpo: the preference loss, TRL's name: {', '.join(PREF_LOSSES)} (sigmoid is "
                                    "DPO's own)")
    dataset: str = arg("", "comma list of registry names, e.g. spider_train (dpo: datasets `sqltune samples` made, "
                           "whose preference pairs it reads)")
    dataset_dir: str = arg("data/prepared", "folder holding dataset_info.json and the prepared JSONL files")
    template: str = arg("auto", f"chat template: {', '.join(TEMPLATES)}")
    finetuning_type: str = arg("lora", f"what to train: {', '.join(FINETUNING_TYPES)}")
    quantization_bit: Optional[int] = arg(None, "4 or 8 for QLoRA (bitsandbytes); implies finetuning_type qlora")
    lora_rank: int = arg(8, "LoRA rank r")
    lora_alpha: int = arg(16, "LoRA alpha")
    lora_dropout: float = arg(0.05, "LoRA dropout")
    lora_target: str = arg("all", "comma list of module names to adapt, or `all` for every linear layer")
    freeze_trainable_layers: int = arg(2, "with finetuning_type freeze: train only the last N decoder layers")
    max_source_length: int = arg(1024, "prompt tokens kept (the schema is cut first; the question is kept)")
    max_target_length: int = arg(256, "answer tokens kept")
    output_dir: str = arg("output/adapter", "where the adapter (or full model), tokenizer and logs go")
    overwrite_output_dir: bool = arg(False, "replace an existing, non-empty output_dir: the new run works in "
                                            "<output_dir>.partial and replaces it only once complete")
    resume: bool = arg(False, "continue the latest complete checkpoint (in <output_dir>.partial when an unfinished "
                              "replacing run left it, else in output_dir); the settings must match the saved ones")
    per_device_train_batch_size: int = arg(1, "examples per device per step")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float = arg(2e-4, "peak learning rate")
    # transformers.SchedulerType names that need no extra arguments or evaluation (a test checks them against it)
    SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                  "inverse_sqrt")
    lr_scheduler_type: str = arg("cosine", f"learning-rate schedule: {', '.join(SCHEDULERS)}")
    warmup_ratio: float = arg(0.0, "fraction of steps spent warming up")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    num_train_epochs: float = arg(1.0, "epochs over the dataset (ignored when max_steps > 0)")
    max_steps: int = arg(-1, "stop after this many optimizer steps (-1 = use num_train_epochs)")
    max_samples: int = arg(0, "train on a seeded random sample of N records (0 = all)")
    max_train_minutes: float = arg(0.0, "stop (and save) after this much training time (0 = no limit)")
    schedule_to_budget: bool = arg(False, "with --max_train_minutes: the learning-rate schedule ends when the time "
                                          "budget does, if that comes before the last step, so a run the budget "
                                          "stops ends decayed instead of cut mid-schedule (the budget then counts "
                                          "over resumes)")
    logging_steps: int = arg(10, "log the loss every N steps")
    save_steps: int = arg(500, "write a checkpoint every N steps")
    save_total_limit: int = arg(2, "checkpoints kept")
    bf16: bool = arg(False, "train in bfloat16 mixed precision")
    fp16: bool = arg(False, "train in float16 mixed precision (GPU)")
    gradient_checkpointing: bool = arg(False, "trade compute for memory")
    trim_host_memory_every: int = arg(0, "every N optimizer steps, hand the heap memory training freed back to the "
                                         "system (glibc's malloc_trim; 0 = never): on a CPU, resident memory "
                                         "otherwise grows over a long run of varying batch shapes; at 1 it cost "
                                         "1.18x the time per step (BENCHMARKS.md, \"Host memory over a CPU run\")")
    group_by_length: bool = arg(True, "batch examples of similar length together (less padding)")
    share_prompt_prefix: bool = arg(True, "sft: batch examples whose prompts begin alike (one database's schema) "
                                          "together and run the shared tokens once per batch: the same loss, a step "
                                          "several times faster on Spider-style prompts (off with --packing, "
                                          "DeepSpeed or FSDP)")
    seed: int = arg(42, "random seed for data order and initialisation")
    plot_loss: bool = arg(False, "write training_loss.png (with --stage grpo also training_reward.png)")
    deepspeed: str = arg("", "DeepSpeed config file passed through to transformers/Accelerate (GPU, optional; "
                             "examples: configs/deepspeed_zero2.json, configs/deepspeed_zero3.json)")
    fsdp: str = arg("", "PyTorch FSDP for the Trainer (several GPUs): `true`, or options such as `full_shard auto_wrap`")
    fsdp_config: str = arg("", "FSDP settings file (JSON) passed to the Trainer with --fsdp")
    attn_implementation: str = arg("sdpa", "attention kernel: sdpa, flash_attention_2 (needs flash_attn) or eager")
    packing: bool = arg(False, "padding-free batches: the examples of a batch back to back in one row, position ids "
                               "restarting per example, no attention across examples (on a GPU best with "
                               "flash_attention_2; with sdpa/eager a per-example mask spans the whole row)")
    report_to: str = arg("none", "transformers report_to (none, tensorboard, wandb, ...)")
    quiet: bool = arg(False, "no progress bar or progress lines (step, time left, loss)")
    # --stage grpo: TRL's GRPOTrainer, rewarded by running each sampled SQL against the gold (sqltune/train/grpo.py)
    num_generations: int = arg(8, "grpo: completions sampled per prompt (one group); per_device_train_batch_size x "
                                  "gradient_accumulation_steps counts completions and must be a multiple of it")
    max_completion_length: int = arg(256, "grpo: tokens a sampled completion may have at most")
    grpo_temperature: float = arg(1.0, "grpo: sampling temperature of the completions")
    grpo_beta: float = arg(0.0, "grpo: KL coefficient against the starting model (0: no reference model is kept)")
    grpo_loss_type: str = arg("dapo", f"grpo: TRL's loss: {', '.join(GRPO_LOSSES)}")
    reward_shape: str = arg("1.0,0.1,0", "grpo: rewards MATCH,RUNS,FAILS[,NO_SQL]: the SQL's result is the gold's, "
                                         "it runs but differs, it fails (error, timeout); no SQL found (default: "
                                         "the FAILS value)")
    reward_timeout: float = arg(30.0, "grpo: seconds a sampled query may run in the sandbox (it fails past that)")
    rollout_backend: str = arg("auto", "grpo: what samples the completions: hf (transformers' generate), vllm "
                                       "(TRL's colocated vLLM, on a GPU), auto (vllm when it imports and a GPU is "
                                       "there, else hf)")

    def __post_init__(self):
        _check(self.stage in TRAIN_STAGES, f"--stage must be one of {', '.join(TRAIN_STAGES)}, not {shown(self.stage)}")
        self._check_dpo()
        if self.quantization_bit is not None:
            _check(self.quantization_bit in (4, 8), "--quantization_bit must be 4 or 8")
            if self.finetuning_type == "lora":
                self.finetuning_type = "qlora"
            _check(self.finetuning_type == "qlora", f"--quantization_bit needs --finetuning_type lora or qlora "
                   f"(a {self.quantization_bit}-bit base cannot be trained with finetuning_type {self.finetuning_type})")
        _check(self.finetuning_type in FINETUNING_TYPES,
               f"--finetuning_type must be one of {', '.join(FINETUNING_TYPES)}, "
               f"not {shown(self.finetuning_type)}")
        if self.finetuning_type == "qlora" and self.quantization_bit is None:
            self.quantization_bit = 4
        _check(self.template in TEMPLATES,
               f"--template must be one of {', '.join(TEMPLATES)}, not {shown(self.template)}")
        _check(self.lora_rank > 0, "--lora_rank must be > 0")
        _check(self.max_source_length > 0 and self.max_target_length > 0,
               "--max_source_length and --max_target_length must be > 0")
        _check(self.per_device_train_batch_size > 0, "--per_device_train_batch_size must be > 0")
        _check(self.gradient_accumulation_steps > 0, "--gradient_accumulation_steps must be > 0")
        for name in ("learning_rate", "lora_dropout", "warmup_ratio", "weight_decay", "num_train_epochs",
                     "max_train_minutes"):  # the Python API bypasses the command line's number checks
            _check(math.isfinite(getattr(self, name)), f"--{name} must be a finite number, not {getattr(self, name)}")
        _check(self.learning_rate > 0, "--learning_rate must be > 0")
        _check(0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), not {self.lora_dropout}")
        _check(self.lora_alpha > 0, "--lora_alpha must be > 0")
        _check(0 <= self.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1), not {self.warmup_ratio}")
        _check(self.weight_decay >= 0, "--weight_decay must be >= 0")
        _check(self.max_train_minutes >= 0, "--max_train_minutes must be >= 0 (0 = no limit)")
        _check(not self.schedule_to_budget or self.max_train_minutes > 0,
               "--schedule_to_budget needs --max_train_minutes (the time budget the schedule ends with)")
        _check(self.max_samples >= 0, "--max_samples must be >= 0 (0 = all)")
        _check(self.save_total_limit > 0, "--save_total_limit must be > 0 (--resume needs a checkpoint)")
        _check(self.freeze_trainable_layers > 0, "--freeze_trainable_layers must be > 0")
        _check(self.lr_scheduler_type in self.SCHEDULERS,
               f"--lr_scheduler_type must be one of {', '.join(self.SCHEDULERS)}, "
               f"not {shown(self.lr_scheduler_type)}")
        _check(self.max_steps == -1 or self.max_steps > 0,
               f"--max_steps must be > 0, or -1 to train for --num_train_epochs (not {self.max_steps})")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "set --max_steps or --num_train_epochs above 0")
        _check(self.save_steps > 0 and self.logging_steps > 0, "--save_steps and --logging_steps must be > 0")
        _check(self.trim_host_memory_every >= 0, f"--trim_host_memory_every must be >= 0 (0 = never), "
                                                 f"not {self.trim_host_memory_every}")
        _check(not (self.bf16 and self.fp16), "choose one of --bf16 and --fp16")
        _check(self.attn_implementation in ("sdpa", "flash_attention_2", "eager"),
               f"--attn_implementation must be sdpa, flash_attention_2 or eager, "
               f"not {shown(self.attn_implementation)}")
        _check(not (self.fsdp and self.deepspeed), "choose one of --fsdp and --deepspeed")
        _check(not self.fsdp_config or bool(self.fsdp), "--fsdp_config needs --fsdp")
        self._check_grpo()

    def _check_grpo(self) -> None:
        _check(self.num_generations >= 2, f"--num_generations must be 2 or more (GRPO compares the completions of a "
                                          f"prompt), not {self.num_generations}")
        _check(self.max_completion_length > 0, "--max_completion_length must be > 0")
        for name in ("grpo_temperature", "grpo_beta", "reward_timeout"):
            _check(math.isfinite(getattr(self, name)), f"--{name} must be a finite number, not {getattr(self, name)}")
        _check(self.grpo_temperature > 0,
               f"--grpo_temperature must be > 0 (GRPO samples), not {self.grpo_temperature}")
        _check(self.grpo_beta >= 0, f"--grpo_beta must be >= 0, not {self.grpo_beta}")
        _check(self.reward_timeout > 0, f"--reward_timeout must be > 0, not {self.reward_timeout}")
        _check(self.grpo_loss_type in GRPO_LOSSES,
               f"--grpo_loss_type must be one of {', '.join(GRPO_LOSSES)}, not {shown(self.grpo_loss_type)}")
        _check(self.rollout_backend in ("auto", "hf", "vllm"),
               f"--rollout_backend must be auto, hf or vllm, not {shown(self.rollout_backend)}")
        reward_shape_values(self.reward_shape)
        if self.stage != "grpo":  # never a setting silently ignored
            given = [f"--{name}" for name in GRPO_SETTINGS if getattr(self, name) != TrainConfig.__dataclass_fields__[
                name].default]
            _check(not given, f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --stage grpo")
        if self.stage == "grpo":
            per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
            _check(per_step % self.num_generations == 0,
                   f"--stage grpo: per_device_train_batch_size x gradient_accumulation_steps ({per_step} completions "
                   f"per step) must be a multiple of --num_generations {self.num_generations} (each prompt's "
                   f"completions form one group), e.g. --per_device_train_batch_size {self.num_generations}")
            _check(not self.packing, "--packing is for --stage sft (GRPO batches its own completions)")
            _check(not self.adapter or self.grpo_beta == 0,
                   f"--stage grpo --adapter needs --grpo_beta 0, not {self.grpo_beta}: its reference would be the base "
                   f"model without the adapter (merge the adapter first with `sqltune merge` to keep a KL term)")

    def _check_dpo(self) -> None:
        _check(math.isfinite(self.dpo_beta) and self.dpo_beta > 0, f"--dpo_beta must be > 0, not {self.dpo_beta}")
        _check(self.pref_loss in PREF_LOSSES,
               f"--pref_loss must be one of {', '.join(PREF_LOSSES)}, not {shown(self.pref_loss)}")
        _check(not self.adapter or self.finetuning_type in ("lora", "qlora") or self.quantization_bit is not None,
               f"--adapter goes on training a LoRA adapter: it needs --finetuning_type lora or qlora, not "
               f"{shown(self.finetuning_type)}")
        if self.stage != "dpo":  # never a setting silently ignored
            _check(self.dpo_beta == 0.1 and self.pref_loss == "sigmoid", "--dpo_beta and --pref_loss are for --stage dpo")
            return
        _check(not self.packing, "--packing is for --stage sft (preference pairs are batched by TRL's DPOTrainer)")
