"""Training on a shared prompt once per batch: every question of a database starts with the same schema.

A Spider prompt is its database's schema (hundreds of tokens, with example rows) followed by one question; the answer
is a few dozen tokens. Batches drawn at random run the schema through the model once per example. Here the sampler
puts examples whose prompts begin alike (the same `instruction` and history: the same database) in one batch, and
the training forward runs the tokens every row of the batch shares once, keeps their keys and values as a KV cache
with gradients, repeats that cache over the rows, and runs only each row's rest (question and answer) against it.
The backward pass goes through the cache into the shared tokens once. The loss and its gradients are those of the
rows run whole (the shared part holds no label, so no prediction is lost); only a LoRA dropout mask on the shared
tokens is common to the rows instead of drawn per row. On Qwen2.5-Coder-0.5B with 8 Spider questions of one database
a training step took 4-8 times less time (benchmarks/train_throughput.py measures it against the plain Trainer).

The forward falls back to running every row whole when too few tokens are shared or with gradient checkpointing
(which drops the cache). Grouping and forward are off with `--no-share_prompt_prefix`, with --packing, and under
DeepSpeed or FSDP.
"""

from __future__ import annotations

import inspect
import os
import random

import torch

IGNORE_INDEX = -100
MIN_SHARED_TOKENS = 16  # below this the second decoder call costs more than the shared tokens save


def prompt_sharing(cfg) -> bool:
    """Whether this training run shares prompts: asked for, not packed, and no parameter sharding (DeepSpeed, FSDP,
    also from an Accelerate config), under which a decoder called twice in one forward is untested here."""
    sharded = cfg.deepspeed or cfg.fsdp or any(
        os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true", "yes") for name in ("DEEPSPEED", "FSDP"))
    return bool(cfg.share_prompt_prefix and not cfg.packing and not sharded)


def prefix_key(record: dict) -> str:
    """What a prompt begins with before its question: the instruction (schema) and the dialogue so far."""
    history = record.get("history") or []
    return repr((record.get("instruction", ""), [tuple(turn) for turn in history]))


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> int:
    """How many leading tokens every row shares that can be run once: equal ids, no padding, and ending before the
    first position whose output is needed (the one before a row's first label). 0 when the rows cannot share."""
    if input_ids.dim() != 2 or input_ids.shape[0] < 2 or attention_mask is None:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    shared = int(same.long().cumprod(0).sum())
    labelled = labels != IGNORE_INDEX
    if labelled.any():
        first = torch.where(labelled.any(1), labelled.long().argmax(1), labels.shape[1])
        shared = min(shared, int(first.min()) - 1)
    return max(0, min(shared, input_ids.shape[1] - 1))


def decode_with_shared_prefix(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared: int,
                              **kwargs) -> torch.Tensor:
    """The decoder's last hidden states of the positions after `shared`, for every row, with the first `shared`
    tokens (equal in every row) run once. Returns None when the decoder kept no cache (gradient checkpointing)."""
    rows = input_ids.shape[0]
    head = decoder(input_ids=input_ids[:1, :shared], use_cache=True, **kwargs)
    cache = getattr(head, "cache", None) or getattr(head, "past_key_values", None)
    if cache is None:
        return None
    cache.batch_repeat_interleave(rows)
    tail = decoder(input_ids=input_ids[:, shared:], attention_mask=attention_mask, use_cache=True,
                   **{_cache_argument(decoder): cache}, **kwargs)
    return tail.last_hidden_state


def _cache_argument(decoder) -> str:
    """transformers 5.2x calls the decoder's KV-cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class PrefixGroupedSampler(torch.utils.data.Sampler):
    """Indices in batches of `batch_size` whose examples share a prompt prefix where possible.

    Each epoch (seeded by `seed + epoch`, so a resumed run skips the same batches): each group's members are
    shuffled and cut into whole batches; the leftovers of all groups are pooled, ordered by length (little padding)
    and cut into batches too; all batches are shuffled, and the one short batch, if any, comes last, so that the
    DataLoader's cuts fall on the batches' edges."""

    def __init__(self, groups: list[str], lengths: list[int], batch_size: int, seed: int = 0):
        self.groups, self.lengths = groups, lengths
        self.batch_size, self.seed, self.epoch = max(1, batch_size), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        members: dict[str, list[int]] = {}
        for i, key in enumerate(self.groups):
            members.setdefault(key, []).append(i)
        whole, left = [], []
        for key in sorted(members):
            ids = members[key]
            rng.shuffle(ids)
            cut = len(ids) - len(ids) % self.batch_size
            whole += [ids[j:j + self.batch_size] for j in range(0, cut, self.batch_size)]
            left += ids[cut:]
        left.sort(key=lambda i: (self.lengths[i], rng.random()))
        whole += [left[j:j + self.batch_size] for j in range(0, len(left), self.batch_size)]
        short = [b for b in whole if len(b) < self.batch_size]
        full = [b for b in whole if len(b) == self.batch_size]
        rng.shuffle(full)
        return full + short

    def shared_batches(self) -> int:
        """How many of an epoch's batches hold examples of one group only (and more than one of them)."""
        return sum(1 for b in self.batches() if len(b) > 1 and len({self.groups[i] for i in b}) == 1)

    def __iter__(self):
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.groups)


def prefix_grouped(trainer_class, groups: list[str], lengths: list[int]):
    """`trainer_class` drawing its training batches from a PrefixGroupedSampler."""

    class PrefixGroupedTrainer(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            return PrefixGroupedSampler(groups, lengths, self._train_batch_size, self.args.seed)

    return PrefixGroupedTrainer
