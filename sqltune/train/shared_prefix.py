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

A database's questions beyond a multiple of the batch size form a short batch of their own (on one process, where
transformers takes whole batches from us); only single leftovers are pooled into batches of several databases, and
those take no more tokens than the largest shared batch.

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
    and cut into batches that run whole.

    Without `own_remainders` every batch but the last has `batch_size` examples: all batches are shuffled and the one
    short batch, if any, comes last, so that a DataLoader cutting the indices into batches of `batch_size` cuts on
    the batches' edges. With it (PrefixBatchSampler hands the batches over as they are) a group's remainder of two
    or more is a short batch of its own, which still shares its prompt (on Spider at batch 8, 52 of 868 batches
    were pooled, every row's schema run whole; now 3 of 916), and a pooled batch takes no more tokens than the
    largest shared batch runs (`prefix_lengths`: each example's tokens shared with its group), so steps stay alike
    in cost. (Not in memory: one step on Spider's largest shared batch, 1506 tokens run, peaked at 8.2 GB RSS, on
    the largest pooled batch of 8 whole prompts, 6259 tokens, at 4.1: benchmarks/batch_plan.py --peak.)"""

    def __init__(self, groups: list[str], lengths: list[int], batch_size: int, seed: int = 0,
                 own_remainders: bool = False, prefix_lengths: list[int] | None = None):
        self.groups, self.lengths = groups, lengths
        self.batch_size, self.seed, self.epoch = max(1, batch_size), seed, 0
        self.own_remainders = own_remainders
        self.prefix_lengths = prefix_lengths or [0] * len(groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def tokens_run(self, batch: list[int]) -> int:
        """Tokens a batch puts through the model: its shared prefix once when it is one group's, else every row."""
        total = sum(self.lengths[i] for i in batch)
        if len(batch) > 1 and len({self.groups[i] for i in batch}) == 1:
            total -= (len(batch) - 1) * self.prefix_lengths[batch[0]]
        return total

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
            if self.own_remainders and len(ids) - cut > 1:
                whole.append(ids[cut:])
            else:
                left += ids[cut:]
        left.sort(key=lambda i: (self.lengths[i], rng.random()))
        if not self.own_remainders:
            whole += [left[j:j + self.batch_size] for j in range(0, len(left), self.batch_size)]
            short = [b for b in whole if len(b) < self.batch_size]
            full = [b for b in whole if len(b) == self.batch_size]
            rng.shuffle(full)
            return full + short
        shared = [self.tokens_run(b) for b in whole if len(b) > 1]
        whole += self._pooled(left, max(shared) if shared else None)
        rng.shuffle(whole)
        return whole

    def _pooled(self, left: list[int], cap: int | None) -> list[list[int]]:
        """`left` (ordered by length) cut into batches of at most `batch_size` examples and, with a cap, at most
        `cap` tokens (a longer example alone)."""
        batches, batch, tokens = [], [], 0
        for i in left:
            if batch and (len(batch) == self.batch_size or (cap is not None and tokens + self.lengths[i] > cap)):
                batches.append(batch)
                batch, tokens = [], 0
            batch.append(i)
            tokens += self.lengths[i]
        return batches + ([batch] if batch else [])

    def shared_batches(self) -> int:
        """How many of an epoch's batches hold examples of one group only (and more than one of them)."""
        return sum(1 for b in self.batches() if len(b) > 1 and len({self.groups[i] for i in b}) == 1)

    def __iter__(self):
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.groups)


try:  # transformers >= 5.19 hands a BatchRebalanceSampler to its DataLoader as the batch_sampler
    from transformers.trainer_pt_utils import BatchRebalanceSampler as _HandedOverAsBatches
except ImportError:  # older: the batches are cut by the DataLoader (no remainder batches)
    _HandedOverAsBatches = None


def variable_batches_possible(world_size: int) -> bool:
    """Whether the Trainer can take batches of varying size from us: transformers passes a BatchRebalanceSampler
    (and so this subclass) to the DataLoader whole, as its batch_sampler; one process only, since the Trainer then
    expects the batch sampler to pick each rank's batches itself."""
    return _HandedOverAsBatches is not None and world_size == 1


if _HandedOverAsBatches is not None:
    class PrefixBatchSampler(_HandedOverAsBatches):
        """A PrefixGroupedSampler's batches as they are, for the DataLoader's batch_sampler. It subclasses
        BatchRebalanceSampler only for the path transformers opens to it (none of its algorithm runs)."""

        def __init__(self, sampler: PrefixGroupedSampler):  # noqa: D107 (BatchRebalanceSampler's init: not wanted)
            self.sampler, self._cached = sampler, (None, [])

        def set_epoch(self, epoch: int) -> None:
            self.sampler.set_epoch(epoch)

        def batches(self) -> list[list[int]]:
            if self._cached[0] != self.sampler.epoch:
                self._cached = (self.sampler.epoch, self.sampler.batches())
            return self._cached[1]

        def shared_batches(self) -> int:
            return self.sampler.shared_batches()

        def __iter__(self):
            return iter(self.batches())

        def __len__(self) -> int:
            return len(self.batches())


def group_prefix_lengths(groups: list[str], input_ids: list[list[int]]) -> list[int]:
    """Per example, the leading tokens all examples of its group have in common (0 for an example alone)."""
    first: dict[str, list[int]] = {}
    common: dict[str, int] = {}
    counts: dict[str, int] = {}
    for key, ids in zip(groups, input_ids):
        counts[key] = counts.get(key, 0) + 1
        if key not in first:
            first[key], common[key] = ids, len(ids)
            continue
        ref, n = first[key], min(common[key], len(ids))
        same = torch.tensor(ref[:n]) == torch.tensor(ids[:n])
        common[key] = int(same.long().cumprod(0).sum()) if n else 0
    return [common[key] if counts[key] > 1 else 0 for key in groups]


def grouped_sampler(groups: list[str], lengths: list[int], batch_size: int, seed: int, world_size: int,
                    prefix_lengths: list[int] | None = None):
    """What the Trainer draws its training batches from: whole batches (a database's remainder its own batch,
    pooled batches capped in tokens) on one process where transformers allows it, else indices cut into batches of
    `batch_size`. Either answers batches() and shared_batches()."""
    if variable_batches_possible(world_size):
        return PrefixBatchSampler(PrefixGroupedSampler(groups, lengths, batch_size, seed, own_remainders=True,
                                                       prefix_lengths=prefix_lengths))
    return PrefixGroupedSampler(groups, lengths, batch_size, seed)


def prefix_grouped(trainer_class, groups: list[str], lengths: list[int], prefix_lengths: list[int] | None = None):
    """`trainer_class` drawing its training batches from grouped_sampler."""

    class PrefixGroupedTrainer(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            return grouped_sampler(groups, lengths, self._train_batch_size, self.args.seed, self.args.world_size,
                                   prefix_lengths)

    return PrefixGroupedTrainer
