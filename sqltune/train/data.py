"""Training data: prepared records -> tokenised examples (answer-only labels) -> padded batches.

Batches are padded to their own longest example (never to a global maximum), and with length grouping the
examples of a batch have similar lengths, so little compute goes to padding. With packing (`--packing`) a batch is
one row holding its examples back to back, with no padding at all: position ids restart at 0 for every example and
no attention mask is passed, from which transformers builds a per-example (block-diagonal causal) mask for sdpa and
eager, and flash_attention_2 runs its variable-length kernel; either way no example attends to another. The loss is
that of the same examples unpacked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from sqltune.data.registry import lookup_many
from sqltune.errors import SqltuneError
from sqltune.io import read_jsonl
from sqltune.templates import Template, encode_example


def seeded_sample(items: list, n: int, seed: int) -> list:
    """With 0 < n < len(items), a seeded random n of them in their order (max_samples); else all of them."""
    if 0 < n < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), n))
        return [items[i] for i in keep]
    return items


def load_records(dataset_dir: str, names: str, max_samples: int = 0, seed: int = 0) -> list[dict]:
    """All records of the named datasets; with max_samples, a seeded random sample of them (in source order)."""
    records: list[dict] = []
    for entry in lookup_many(dataset_dir, names):
        for i, row in enumerate(read_jsonl(entry["file_name"])):
            if "output" not in row or "input" not in row:
                raise SqltuneError(f"{entry['file_name']} record {i + 1} has no 'input' or 'output' field")
            records.append(row)
    records = seeded_sample(records, max_samples, seed)
    if not records:
        raise SqltuneError(f"dataset {names!r} has no records")
    return records


def tokenize_records(records: list[dict], tokenizer, template: Template, max_source_length: int,
                     max_target_length: int):
    """A datasets.Dataset with input_ids, labels and length; plus counts of cut prompts and answers."""
    from datasets import Dataset

    rows = {"input_ids": [], "labels": [], "length": []}
    prompts_cut = answers_cut = 0
    for rec in records:
        ex = encode_example(tokenizer, template, rec, max_source_length, max_target_length)
        rows["input_ids"].append(ex["input_ids"])
        rows["labels"].append(ex["labels"])
        rows["length"].append(len(ex["input_ids"]))
        prompts_cut += ex["prompt_cut"]
        answers_cut += ex["answer_cut"]
    return Dataset.from_dict(rows), {"prompts_cut": prompts_cut, "answers_cut": answers_cut,
                                     "train_tokens": sum(rows["length"])}


def _no_packed_count_note(record) -> bool:
    """A packed row has no padding and no attention mask, so the Trainer's fallback (count every token) is right:
    its warning about it, repeated at every step, is dropped."""
    return "Could not determine method to count non-padding" not in record.getMessage()


@dataclass
class Collator:
    """Right-pads a batch to its longest example, labels padded with -100; with packing, one row of the examples back
    to back with restarting position ids (transformers' DataCollatorWithFlattening). Counts the real tokens seen."""

    pad_token_id: int
    packing: bool = False
    tokens_seen: int = field(default=0)

    def __post_init__(self):
        if self.packing:
            import logging

            logging.getLogger("transformers.trainer").addFilter(_no_packed_count_note)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            from transformers import DataCollatorWithFlattening

            batch = DataCollatorWithFlattening(return_position_ids=True)(
                [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
            self.tokens_seen += batch["input_ids"].numel()
            return batch
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        self.tokens_seen += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
