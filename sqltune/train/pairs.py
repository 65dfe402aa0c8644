"""Preference data for `train --stage dpo`: the pairs `sqltune samples` registered beside a dataset, tokenised with
the chat template exactly as SFT records are (sqltune/templates.py: encode_preference).

A pair is a prepared record's prompt fields (`instruction`, `input`, `history`) with a `chosen` (right) and a
`rejected` (wrong) SQL answer. The dataset holds prompt_ids, chosen_ids and rejected_ids, which TRL's
DataCollatorForPreference pads into the chosen and rejected halves of a batch.
"""

from __future__ import annotations

from pathlib import Path

from sqltune.data.registry import lookup
from sqltune.errors import SqltuneError
from sqltune.io import read_jsonl
from sqltune.templates import Template, encode_preference
from sqltune.train.data import seeded_sample


def load_pairs(dataset_dir: str, names: str, max_samples: int = 0, seed: int = 0) -> list[dict]:
    """All pairs of the named datasets; with max_samples, a seeded random sample of them (in source order). A dataset
    without pairs, a missing pairs file or a malformed pair is one line."""
    pairs: list[dict] = []
    items = [n.strip() for n in names.split(",") if n.strip()]
    if not items:
        raise SqltuneError("--dataset is required (a dataset `sqltune samples` made, with preference pairs)")
    for name in items:
        entry = lookup(dataset_dir, name)
        if not entry.get("pairs"):
            raise SqltuneError(f"dataset {name!r} has no preference pairs: --stage dpo learns from the pairs "
                               "`sqltune samples` registers (its --name, e.g. spider_train_samples)")
        path = Path(entry["pairs"])
        if not path.is_file():
            raise SqltuneError(f"dataset {name!r}: its pairs file {path} is missing (run `sqltune samples` again)")
        for i, row in enumerate(read_jsonl(path)):
            if not all(isinstance(row.get(k), str) for k in ("input", "chosen", "rejected")):
                raise SqltuneError(f"{path} pair {i + 1} needs text fields 'input', 'chosen' and 'rejected'")
            pairs.append(row)
    pairs = seeded_sample(pairs, max_samples, seed)
    if not pairs:
        raise SqltuneError(f"dataset {names!r} has no preference pairs (no question had both a right and a wrong "
                           "candidate): sample more candidates per question")
    return pairs


def tokenize_pairs(pairs: list[dict], tokenizer, template: Template, max_source_length: int,
                   max_target_length: int):
    """A datasets.Dataset with prompt_ids, chosen_ids and rejected_ids; plus counts of cut prompts and answers and
    the tokens of one epoch (prompt, chosen and rejected answer: the chosen and rejected rows both hold the prompt)."""
    from datasets import Dataset

    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    prompts_cut = answers_cut = tokens = 0
    for pair in pairs:
        ex = encode_preference(tokenizer, template, pair, max_source_length, max_target_length)
        for key in rows:
            rows[key].append(ex[key])
        prompts_cut += ex["prompt_cut"]
        answers_cut += ex["answer_cut"]
        tokens += 2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"])
    return Dataset.from_dict(rows), {"prompts_cut": prompts_cut, "answers_cut": answers_cut, "train_tokens": tokens}
