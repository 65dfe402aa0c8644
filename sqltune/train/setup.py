"""Model setup per finetuning type: which parameters learn, and the guards that keep their gradients flowing.

- lora: a PEFT LoRA adapter on `lora_target` modules (`all` = every linear layer but the output head);
- qlora: the base loaded in 4 or 8 bits (bitsandbytes), prepared for k-bit training, then LoRA;
- freeze: only the last `freeze_trainable_layers` decoder layers learn;
- full: every parameter learns.

The 4-bit trap: on CPUs with AVX-512-BF16, bitsandbytes repacks a 4-bit weight for a fast inference kernel the
first time the layer runs in eval mode without gradients, and that kernel passes no gradient back, so every LoRA
gradient stays None. `guard_4bit_for_training` undoes any repacking and switches it off before training.
"""

from __future__ import annotations

import torch

from sqltune.errors import SqltuneError


def decoder_layers(model) -> torch.nn.ModuleList:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(module):
            return module
    raise SqltuneError("could not find the decoder layers of this model for finetuning_type freeze")


def guard_4bit_for_training(model) -> int:
    """Unpack CPU-repacked 4-bit weights and stop further repacking; returns how many layers it touched."""
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    touched = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
                touched += 1
    return touched


def lora_targets(model, lora_target: str) -> list[str] | str:
    if lora_target.strip() == "all":
        return "all-linear"
    names = [t.strip() for t in lora_target.split(",") if t.strip()]
    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    unknown = [n for n in names if n not in present]
    if unknown:
        raise SqltuneError(f"--lora_target names modules this model lacks: {', '.join(unknown)} "
                           f"(linear layers here include: {', '.join(sorted(linear_names(model))[:8])})")
    return names


def linear_names(model) -> set[str]:
    return {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}


def load_for_training(cfg, model_path):
    """The base model as cfg.finetuning_type trains it: in its dtype (train_dtype), 4 or 8 bits for QLoRA; a memory
    warning first when it may not fit (sqltune/train/memory.py)."""
    import sys

    from sqltune.loading import load_model
    from sqltune.train.budget import _world
    from sqltune.train.memory import preflight

    quant = cfg.quantization_bit if cfg.finetuning_type == "qlora" else None
    dtype = train_dtype(cfg)
    if (warning := preflight(cfg, model_path, dtype.itemsize)) and _world()[0] == 0:
        print(f"train: {warning}", file=sys.stderr)
    return load_model(model_path, quant, dtype=dtype, attn_implementation=cfg.attn_implementation)


def ready_for_training(model, cfg):
    """(model, trainable parameters): nothing trainable is one line; gradient checkpointing on when asked."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise SqltuneError("no parameter is trainable with these settings")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model, trainable


def trainable_model(cfg, model_path, adapter=None):
    """(model, trainable parameters): the base loaded for cfg.finetuning_type with exactly the intended parameters
    trainable, or, with `adapter`, that LoRA adapter going on learning (load_with_adapter)."""
    if adapter is not None:
        return ready_for_training(load_with_adapter(cfg, model_path, adapter), cfg)
    return ready_for_training(setup_trainable(load_for_training(cfg, model_path), cfg), cfg)


def lora_config(model, cfg):
    """The LoRA adapter cfg asks for (rank, alpha, dropout, target modules checked against the model)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(model, cfg.lora_target), task_type="CAUSAL_LM")


def prepare_kbit(model, cfg):
    """A 4- or 8-bit base made ready for QLoRA: CPU repacking undone (the 4-bit trap above), k-bit preparation."""
    from peft import prepare_model_for_kbit_training

    guard_4bit_for_training(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def setup_trainable(model, cfg):
    """Return the model to train for cfg.finetuning_type, with exactly the intended parameters trainable."""
    kind = cfg.finetuning_type
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if kind == "freeze":
        for p in model.parameters():
            p.requires_grad_(False)
        layers = decoder_layers(model)
        n = min(cfg.freeze_trainable_layers, len(layers))
        for layer in list(layers)[len(layers) - n:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        return model
    from peft import get_peft_model

    if kind == "qlora":
        model = prepare_kbit(model, cfg)
    return get_peft_model(model, lora_config(model, cfg))


def load_prepared(cfg, model_path):
    """The base loaded for cfg.finetuning_type (load_for_training) and, for QLoRA, made ready for k-bit training."""
    model = load_for_training(cfg, model_path)
    return prepare_kbit(model, cfg) if cfg.finetuning_type == "qlora" else model


def load_with_adapter(cfg, model_path, adapter):
    """The base (load_prepared) with the LoRA adapter at `adapter` loaded to go on learning (its own rank and
    targets kept); an adapter of another model is one line (sqltune.loading.attach_adapter)."""
    from sqltune.loading import attach_adapter

    return attach_adapter(load_prepared(cfg, model_path), adapter, trainable=True)


def adapter_read(adapter) -> dict:
    """What a training that goes on from `adapter` records as read: its path and content digest (identity, resume)."""
    from sqltune.digest import model_digest

    return {"adapter_path": str(adapter.resolve()), "adapter_sha256": model_digest(adapter)} if adapter else {}


def missing_gradients(model, finite: bool = True) -> list[str]:
    """Names of trainable parameters that have no gradient (or, with `finite`, a non-finite one)."""
    bad = []
    for name, p in model.named_parameters():
        if p.requires_grad and (p.grad is None or (finite and not torch.isfinite(p.grad).all())):
            bad.append(name)
    return bad


def train_dtype(cfg):
    """The dtype the base weights load in. --bf16: bfloat16 for every finetuning type (full and freeze too: no float32
    copy); --fp16: float16 for LoRA/QLoRA bases (their adapters stay float32), but float32 for full/freeze, whose
    trainable weights the fp16 loss scaler must unscale in float32; neither: float32. QLoRA's compute dtype is this."""
    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16 and cfg.finetuning_type in ("lora", "qlora"):
        return torch.float16
    return torch.float32


def parallel_args(cfg) -> dict:
    """Precision and multi-process settings for TrainingArguments: DeepSpeed config file, or FSDP options and file."""
    return {"bf16": cfg.bf16, "fp16": cfg.fp16, "deepspeed": cfg.deepspeed or None,
            "fsdp": (True if cfg.fsdp.strip().lower() in ("true", "1", "yes") else cfg.fsdp) if cfg.fsdp else None,
            "fsdp_config": cfg.fsdp_config or None}


def gradient_check(args, model) -> list[str] | None:
    """Parameters that got no gradient in the first step, or None when the check cannot be made at this point:
    under DeepSpeed the engine keeps (and zeroes) gradients in its own buffers before on_pre_optimizer_step, and under
    FSDP a rank's parameters may hold no gradient shard. With fp16 a non-finite gradient is the loss scaler's
    overflow step (the step is skipped and the scale lowered), so only missing gradients count there."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        return None
    return missing_gradients(model, finite=not getattr(args, "fp16", False))
