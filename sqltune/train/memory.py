"""A rough pre-flight memory estimate for a training recipe, from config.json alone (before any weight loads).

Without it a recipe too big for the device dies late: CUDA out of memory after minutes of loading, or the kernel's
OOM killer with no message at all on CPU. The formula is deliberately simple and errs high:

    weights      parameters x bytes per weight (4-bit: ~0.56 B, 8-bit: ~1.06 B for the decoder's linear layers)
    gradients    trainable parameters x (4 B for LoRA adapters, which stay float32; else the weights' bytes)
    optimizer    trainable parameters x 2 states (AdamW) x the same bytes
    activations  tokens x learning layers x (10 hidden + 4 intermediate) values x bytes per value;
                 with gradient checkpointing: one hidden vector per layer, plus one whole layer
    loss         one chunk of float32 logits and their gradient (sqltune.train.loss never holds more)
    overhead     1 GiB (CUDA context, allocator slack, Python and torch)

tokens = per_device_train_batch_size x (max_source_length + max_target_length), the worst batch.
"""

from __future__ import annotations

import json
from pathlib import Path

GIB = 1024 ** 3
LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_shape(config: dict) -> dict | None:
    """Sizes of a decoder-only transformer from its config.json (None when they cannot be read)."""
    c = config.get("text_config") or config
    h = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
    layers = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
    vocab = c.get("vocab_size")
    if not (h and layers and vocab):
        return None
    heads = c.get("num_attention_heads") or c.get("n_head") or 1
    kv = h * (c.get("num_key_value_heads") or heads) // heads
    inter = c.get("intermediate_size") or c.get("n_inner") or 4 * h
    per_layer = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                 "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    linear = layers * sum(i * o for i, o in per_layer.values())
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings", config.get("tie_word_embeddings", True)) else 2)
    return {"hidden": h, "layers": layers, "intermediate": inter, "vocab": vocab, "per_layer": per_layer,
            "linear_params": linear, "params": linear + embeddings + layers * 2 * h + h}


def estimate(shape: dict, finetuning_type: str = "lora", quantization_bit: int | None = None, weight_bytes: int = 4,
             batch: int = 1, seq_len: int = 1024, gradient_checkpointing: bool = False, lora_rank: int = 8,
             lora_target: str = "all", freeze_trainable_layers: int = 2, chunk_tokens: int = 1024) -> dict:
    """Bytes per part (weights, gradients, optimizer, activations, loss, overhead) and their `total`."""
    h, layers, inter, vocab = shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    params, linear = shape["params"], shape["linear_params"]
    if quantization_bit:
        weights = linear * (0.56 if quantization_bit == 4 else 1.06) + (params - linear) * weight_bytes
    else:
        weights = params * weight_bytes
    learning_layers = layers
    if finetuning_type in ("lora", "qlora"):
        names = LORA_NAMES if lora_target.strip() == "all" else [t.strip() for t in lora_target.split(",")]
        trainable = layers * sum(lora_rank * sum(shape["per_layer"].get(n, (h, h))) for n in names)
        state_bytes = 4
    elif finetuning_type == "freeze":
        learning_layers = min(freeze_trainable_layers, layers)
        trainable = (linear // layers) * learning_layers
        state_bytes = weight_bytes
    else:
        trainable, state_bytes = params, weight_bytes
    value_bytes = 2 if weight_bytes == 2 or quantization_bit else 4
    tokens = batch * seq_len
    layer_values = tokens * (10 * h + 4 * inter)
    if gradient_checkpointing:
        activations = (tokens * h * learning_layers + layer_values) * value_bytes
    else:
        activations = layer_values * learning_layers * value_bytes
    parts = {"weights": weights, "gradients": trainable * state_bytes, "optimizer": trainable * 2 * state_bytes,
             "activations": activations, "loss": min(tokens, chunk_tokens) * vocab * 4 * 2, "overhead": GIB}
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def estimate_for(cfg, config: dict, weight_bytes: int, changes: dict | None = None) -> dict | None:
    """estimate() for a TrainConfig (fields overridden by `changes`), or None for an unreadable config."""
    shape = model_shape(config)
    if shape is None:
        return None
    from sqltune.train.loss import chunk_tokens

    values = {"finetuning_type": cfg.finetuning_type, "quantization_bit": cfg.quantization_bit,
              "weight_bytes": weight_bytes, "batch": cfg.per_device_train_batch_size,
              "seq_len": cfg.max_source_length + cfg.max_target_length,
              "gradient_checkpointing": cfg.gradient_checkpointing, "lora_rank": cfg.lora_rank,
              "lora_target": cfg.lora_target, "freeze_trainable_layers": cfg.freeze_trainable_layers,
              "chunk_tokens": chunk_tokens(shape["vocab"])}
    values.update(changes or {})
    return estimate(shape, **values)


def available_memory() -> tuple[int, str] | None:
    """Free bytes where training will run: this process's GPU (LOCAL_RANK), else MemAvailable from /proc/meminfo."""
    import os

    import torch

    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        free, _ = torch.cuda.mem_get_info(rank)
        return free, f"GPU cuda:{rank} ({torch.cuda.get_device_name(rank)})"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "CPU RAM"
    except OSError:
        pass
    return None


def advice(cfg, config: dict, weight_bytes: int, free: int) -> list[str]:
    """The flags that would bring this recipe under `free` bytes, each tried alone (then all together)."""
    tries = []
    if cfg.per_device_train_batch_size > 1:
        b = cfg.per_device_train_batch_size
        while b > 1 and estimate_for(cfg, config, weight_bytes, {"batch": b})["total"] > free:
            b //= 2
        acc = cfg.gradient_accumulation_steps * cfg.per_device_train_batch_size // b
        tries.append(({"batch": b}, f"--per_device_train_batch_size {b} --gradient_accumulation_steps {acc}"))
    if not cfg.gradient_checkpointing:
        tries.append(({"gradient_checkpointing": True}, "--gradient_checkpointing"))
    if cfg.finetuning_type != "qlora":
        tries.append(({"finetuning_type": "qlora", "quantization_bit": 4}, "--finetuning_type qlora"))
    if weight_bytes == 4:
        tries.append(({"weight_bytes": 2}, "--bf16"))
    fits = [flag for change, flag in tries if estimate_for(cfg, config, weight_bytes, change)["total"] <= free]
    if not fits and tries:
        together = {k: v for change, _ in tries for k, v in change.items()}
        if estimate_for(cfg, config, weight_bytes, together)["total"] <= free:
            fits = [" ".join(flag for _, flag in tries)]
    return fits


def preflight(cfg, model_path: Path, weight_bytes: int, free: tuple[int, str] | None = None) -> str | None:
    """A warning line when the recipe's estimate exceeds the free memory of the device (None when it fits)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    need = estimate_for(cfg, config, weight_bytes)
    free = free if free is not None else available_memory()
    if need is None or free is None or need["total"] <= free[0]:
        return None
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in need.items() if k != "total")
    fixes = advice(cfg, config, weight_bytes, free[0])
    hint = f"; these would fit: {' | '.join(fixes)}" if fixes else "; even the smallest settings may not fit"
    return (f"warning: this recipe needs about {need['total'] / GIB:.1f} GiB ({parts} GiB) but {free[1]} has "
            f"{free[0] / GIB:.1f} GiB free{hint}")
