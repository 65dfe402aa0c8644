"""The training loss without full-vocabulary logits.

A causal LM's own forward computes `lm_head` on every position and upcasts the whole (tokens x vocabulary) tensor to
float32 before the cross-entropy: for Qwen's 152k vocabulary at batch 8 x 512 tokens that is 2.5 GB, and most of it
is thrown away, because only answer tokens carry labels (the prompt, schema included, is -100). Here the decoder runs
as usual, then only the positions whose next-token label is not -100 go through the output layer: with Liger's fused
linear cross-entropy on a GPU when `liger-kernel` is installed (no logits kept at all), else in chunks of tokens, each
chunk recomputed in the backward pass when there are several (so at most one chunk of logits lives at a time).
The value and the gradients are those of the model's own loss (`model(labels=...)`, `ForCausalLMLoss`): labels
shifted by one, summed and divided by `num_items_in_batch` when the Trainer passes it, else averaged.

It is installed by replacing the causal LM module's `forward` on the instance, so DDP, FSDP and DeepSpeed still enter
the model through its root module. Evaluation and generation (no labels, or eval mode) use the original forward.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from sqltune.train.shared_prefix import MIN_SHARED_TOKENS, decode_with_shared_prefix, shared_prefix_length

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 28  # float32 logits of one chunk: 256 MiB

# Config fields of architectures whose logits are not plain lm_head(hidden): softcapping (Gemma 2/3), scaling (Cohere,
# Granite). Those keep the model's own loss.
_LOGIT_CHANGERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scaling")


def causal_lm(model):
    """The *ForCausalLM module inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(causal) -> str | None:
    """Why the label-only loss cannot stand in for this model's own loss (None when it can)."""
    config = getattr(causal, "config", None)
    for name in _LOGIT_CHANGERS:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0):
            return f"its config sets {name}={value}"
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    decoder = causal.get_decoder() if hasattr(causal, "get_decoder") else None
    if head is None or decoder is None or decoder is causal:
        return "no separate decoder and output layer were found"
    return None


def chunk_tokens(vocab_size: int) -> int:
    return max(128, CHUNK_BYTES // (4 * max(1, vocab_size)))


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _liger(head, hidden: torch.Tensor):
    """Liger's fused linear cross-entropy, when installed and usable: a CUDA tensor and a plain Linear head whose
    weight is really there (not a DeepSpeed ZeRO-3 partition, which only its module's forward gathers)."""
    if not _on_gpu(hidden) or type(head) is not torch.nn.Linear or hasattr(head.weight, "ds_id"):
        return None
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def _chunk_sum(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, reduction="sum")


def label_only_loss(hidden: torch.Tensor, head, labels: torch.Tensor, num_items_in_batch=None,
                    chunk: int | None = None, use_liger: bool = True) -> torch.Tensor:
    """Causal-LM cross-entropy from the decoder's last hidden states, computing logits only where labels are set."""
    labels = labels.to(hidden.device)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    keep = shifted != IGNORE_INDEX
    states, target = hidden[keep], shifted[keep]
    n = target.numel()
    if n == 0:  # nothing to learn in this batch (the model's own loss would be nan): zero, graph kept for DDP
        return hidden.sum() * 0.0
    liger = _liger(head, hidden) if use_liger else None
    if liger is not None:
        total = liger(head.weight, states, target, head.bias)
    else:
        chunk = chunk or chunk_tokens(getattr(head, "out_features", 0) or head.weight.shape[0])
        several = n > chunk and torch.is_grad_enabled()
        total = None
        for start in range(0, n, chunk):
            part = (head, states[start:start + chunk], target[start:start + chunk])
            s = torch.utils.checkpoint.checkpoint(_chunk_sum, *part, use_reentrant=False) if several \
                else _chunk_sum(*part)
            total = s if total is None else total + s
    if num_items_in_batch is None:
        return total / n
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _checkpointing(decoder) -> bool:
    return bool(getattr(decoder, "gradient_checkpointing", False))


def install_label_only_loss(model, chunk: int | None = None, share_prefix: bool = False) -> str:
    """Make training forwards (labels given, train mode) compute the label-only loss and no logits; with
    `share_prefix`, the leading tokens all rows of a batch share run once. Returns what the loss runs on: `liger`,
    `chunked`, or `model's own loss (<why>)` for an architecture whose logits are not plain lm_head(hidden)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    causal = causal_lm(model)
    why = unsupported(causal)
    original = causal.forward
    decoder, head = (None, None) if why else (causal.get_decoder(), causal.get_output_embeddings())

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                num_items_in_batch=None, **kwargs):
        training = labels is not None and causal.training
        if training:
            # No cache in training: it is never read, and transformers builds its per-example (block-diagonal) mask
            # for packed rows (restarting position_ids, no attention mask) only when no cache object exists.
            for name in ("use_cache", "cache", "past_key_values"):
                kwargs.pop(name, None)
            kwargs["use_cache"] = False
        if not training or why or "shift_labels" in kwargs:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        for name in ("logits_to_keep", "return_dict"):
            kwargs.pop(name, None)
        shared = shared_prefix_length(input_ids, attention_mask, labels) \
            if share_prefix and position_ids is None and inputs_embeds is None and not _checkpointing(decoder) else 0
        if shared >= MIN_SHARED_TOKENS:  # the rows' common prompt once (sqltune/train/shared_prefix.py)
            rest = {k: v for k, v in kwargs.items() if k != "use_cache"}
            hidden = decode_with_shared_prefix(decoder, input_ids, attention_mask, shared, **rest)
            if hidden is not None:
                loss = label_only_loss(hidden, head, labels[:, shared:], num_items_in_batch, chunk)
                return CausalLMOutputWithPast(loss=loss)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, **kwargs)
        loss = label_only_loss(out.last_hidden_state, head, labels, num_items_in_batch, chunk)
        return CausalLMOutputWithPast(loss=loss)

    causal.forward = forward
    if why:
        return f"model's own loss ({why})"
    liger = importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()
    return "liger" if liger and type(head) is torch.nn.Linear else "chunked"


@contextlib.contextmanager
def trl_head_on_labelled_positions():
    """While it is open, TRL's fused LM head (DPO and GRPO call `model(..., fused_lm_head=True)`) projects only the
    positions that carry a label on a CPU too, as it does where Triton runs.

    Elsewhere TRL projects every position, prompt and schema included, through the output layer (Qwen's has 152k
    rows), forward and backward (the backward's products in float32 on a CPU), and then zeroes the prompt's
    log-probabilities: it keeps tile shapes fixed so that compilers such as Neuron's do not recompile on every batch.
    Nothing recompiles on a CPU, and a Spider prompt is many times its answer, so there the labelled positions
    alone go through the head: the same log-probabilities and gradients. A TRL without that switch is left as it is."""
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        trl_utils = None
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original
