"""Training on a batch's shared prompt once (sqltune/train/shared_prefix.py): same loss and gradients as the rows
run whole, the shared tokens through the model once, batches of one database, and every fallback."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from sqltune.loading import load_tokenizer
from sqltune.templates import get_template
from sqltune.train.data import Collator, load_records, tokenize_records
from sqltune.train.loss import install_label_only_loss
from sqltune.train.shared_prefix import (PrefixGroupedSampler, grouped_sampler, prefix_grouped, prefix_key,
                                        shared_prefix_length)
from sqltune.train.sft import train
from tests.test_train_speed_paths import grads, lora_model, train_config


def one_database_batch(tiny_model, prepared_demo, n=4):
    """n demo train records of the database with most of them, tokenised and padded as training pads them."""
    tok = load_tokenizer(tiny_model)
    records = load_records(str(prepared_demo), "demo_train")
    key, _ = Counter(prefix_key(r) for r in records).most_common(1)[0]
    chosen = [r for r in records if prefix_key(r) == key][:n]
    assert len(chosen) == n
    dataset, _ = tokenize_records(chosen, tok, get_template("chatml", tok), 512, 64)
    return Collator(tok.pad_token_id)([dataset[i] for i in range(n)])


@pytest.mark.parametrize("num_items", [None, 29])
def test_shared_prompt_gives_the_loss_and_gradients_of_the_rows_run_whole(tiny_model, prepared_demo, num_items):
    """Pins exactness: the schema run once, its KV cache repeated over the rows, gives the value and every LoRA
    gradient of the plain label-only loss (float32), averaged or divided by the Trainer's num_items_in_batch."""
    batch = one_database_batch(tiny_model, prepared_demo)
    shared = shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert shared > 50
    plain = lora_model(tiny_model)
    ours = copy.deepcopy(plain)
    install_label_only_loss(plain)
    install_label_only_loss(ours, share_prefix=True)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    seen = []
    ours.get_base_model().get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    expected = plain(**batch, **extra).loss
    expected.backward()
    got = ours(**batch, **extra).loss
    got.backward()
    rows, width = batch["input_ids"].shape
    assert seen == [(1, shared), (rows, width - shared)]  # the shared tokens went through the model once
    assert abs(got.item() - expected.item()) < 1e-5
    g_plain, g_ours = grads(plain), grads(ours)
    assert g_plain.keys() == g_ours.keys() and len(g_plain) > 0
    for name in g_plain:
        assert torch.allclose(g_ours[name], g_plain[name], atol=1e-5, rtol=1e-4), name


def test_gradient_checkpointing_runs_the_rows_whole(tiny_model, prepared_demo):
    """With gradient checkpointing (which keeps no KV cache) the forward runs every row whole, the same loss."""
    batch = one_database_batch(tiny_model, prepared_demo)
    model = lora_model(tiny_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    install_label_only_loss(model, share_prefix=True)
    seen = []
    model.get_base_model().get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    loss = model(**batch).loss
    assert seen == [batch["input_ids"].shape[0]] and torch.isfinite(loss)


def test_shared_length_stops_before_the_first_needed_output():
    """Only equal, unpadded tokens are shared, and never the position whose output predicts a row's first label."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9]])
    mask = torch.ones_like(ids)
    no_labels = torch.full_like(ids, -100)
    assert shared_prefix_length(ids, mask, no_labels) == 4
    labels = no_labels.clone()
    labels[1, 3] = 4  # row 1 learns its 4th token: the output at position 2 is needed
    assert shared_prefix_length(ids, mask, labels) == 2
    left_padded = mask.clone()
    left_padded[1, 0] = 0
    assert shared_prefix_length(ids, left_padded, no_labels) == 0
    assert shared_prefix_length(ids[:1], mask[:1], no_labels[:1]) == 0  # one row: nothing to share
    assert shared_prefix_length(ids, None, no_labels) == 0
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert shared_prefix_length(same, torch.ones_like(same), torch.full_like(same, -100)) == 2  # one token left


def test_sampler_batches_one_group_each_and_every_example_once():
    """Groups of at least a batch give batches of one group; leftovers are pooled; every index once per epoch; the
    short batch last; the same order for the same seed and epoch (a resume skips the same batches), another for
    the next epoch."""
    groups = ["a"] * 9 + ["b"] * 8 + ["c"] * 3
    lengths = list(range(20))
    sampler = PrefixGroupedSampler(groups, lengths, batch_size=4, seed=3)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(20)) and list(sampler) == [i for b in batches
                                                                                         for i in b]
    assert [len(b) for b in batches] == [4] * 5
    assert sum(len({groups[i] for i in b}) == 1 for b in batches) == 4 == sampler.shared_batches()
    assert PrefixGroupedSampler(groups, lengths, 4, seed=3).batches() == batches
    sampler.set_epoch(1)
    assert sampler.batches() != batches
    odd = PrefixGroupedSampler(["a"] * 5 + ["b"] * 2, list(range(7)), batch_size=4, seed=0).batches()
    assert [len(b) for b in odd] == [4, 3]


def test_a_groups_remainder_is_its_own_short_batch():
    """With own_remainders a database's questions beyond a multiple of the batch make a short batch of their own
    (still one schema, so it still shares) instead of joining a pooled batch of several databases that runs whole:
    in Spider at batch 8 those pooled batches were 52 of 868. A single leftover is still pooled; every index once;
    the same batches for the same seed and epoch; without own_remainders, fixed-size batches as before."""
    groups = ["a"] * 9 + ["b"] * 7 + ["c"] * 1 + ["d"] * 1 + ["e"] * 4
    sampler = PrefixGroupedSampler(groups, list(range(22)), batch_size=4, seed=3, own_remainders=True)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(22))
    kinds = sorted((len(b), "".join(sorted({groups[i] for i in b}))) for b in batches)
    assert kinds == [(3, "acd"), (3, "b"), (4, "a"), (4, "a"), (4, "b"), (4, "e")]
    assert sampler.shared_batches() == 5
    assert PrefixGroupedSampler(groups, list(range(22)), 4, seed=3, own_remainders=True).batches() == batches
    fixed = PrefixGroupedSampler(groups, list(range(22)), batch_size=4, seed=3)
    assert fixed.shared_batches() == 4 and all(len(b) == 4 for b in fixed.batches()[:-1])


def test_pooled_batches_take_no_more_tokens_than_a_shared_one():
    """Pins the token cap on pooled batches: single leftovers (here five prompts of 100 tokens, a batch of 4) are
    cut so that none runs more tokens than the largest one-group batch (90 shared + 4 x 10 = 130 here); with no
    group to share, the batch size alone cuts them."""
    from sqltune.train.shared_prefix import group_prefix_lengths

    groups = ["g"] * 4 + list("vwxyz")
    lengths = [100] * 9
    ids = [[7] * 90 + [i] * 10 for i in range(4)] + [[i] * 100 for i in range(5)]
    common = group_prefix_lengths(groups, ids)
    assert common == [90] * 4 + [0] * 5
    sampler = PrefixGroupedSampler(groups, lengths, batch_size=4, seed=0, own_remainders=True, prefix_lengths=common)
    batches = sampler.batches()
    assert max(sampler.tokens_run(b) for b in batches) == 130
    assert sorted(len(b) for b in batches) == [1, 1, 1, 1, 1, 4]
    alone = PrefixGroupedSampler(list("vwxyz"), [100] * 5, batch_size=4, seed=0, own_remainders=True).batches()
    assert sorted(len(b) for b in alone) == [1, 4]


def test_the_trainer_draws_the_remainder_batches_on_one_process(tiny_model):
    """Pins how the batches reach the Trainer: on one process the DataLoader yields them as they are (sizes 4, 4, 2
    and a pooled 2 here); on several it cuts indices into batches of the batch size (grouped_sampler's fixed
    sampler), since the Trainer then expects a batch sampler to pick each rank's batches itself."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from sqltune.train.shared_prefix import variable_batches_possible

    if not variable_batches_possible(1):
        pytest.skip("this transformers hands no batch sampler to its DataLoader (before 5.19)")
    groups = ["a"] * 6 + ["b"] * 4 + ["c", "d"]
    data = Dataset.from_dict({"input_ids": [[i + 1] for i in range(12)]})
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4, report_to=[], use_cpu=True)
    trainer = prefix_grouped(Trainer, groups, [1] * 12)(
        model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args, train_dataset=data,
        data_collator=lambda rows: torch.tensor([r["input_ids"] for r in rows]))
    loader = trainer.get_train_dataloader()
    sizes = sorted(len(batch) for batch in loader)
    assert sizes == [2, 2, 4, 4] and len(loader) == 4
    assert isinstance(grouped_sampler(groups, [1] * 12, 4, 0, world_size=2), PrefixGroupedSampler)


def test_train_shares_the_schema_and_learns(tiny_model, prepared_demo, tmp_path):
    """`sqltune train` groups one database's questions and runs their schema once per batch (counted in its figures);
    the loss falls as without sharing; --no-share_prompt_prefix (and --packing) turn it off."""
    fast = {"learning_rate": 2e-2, "max_steps": 8, "max_samples": 32}
    shared = train(train_config(tiny_model, prepared_demo, tmp_path / "shared", share_prompt_prefix=True, **fast))
    plain = train(train_config(tiny_model, prepared_demo, tmp_path / "plain", share_prompt_prefix=False, **fast))
    assert shared["shared_prompt_batches"] > 0 and "shared_prompt_batches" not in plain
    assert shared["final_loss"] < shared["first_loss"] - 0.1
    assert abs(shared["final_loss"] - plain["final_loss"]) < 0.15 * plain["final_loss"]
    packed = train(train_config(tiny_model, prepared_demo, tmp_path / "packed", packing=True, max_steps=2))
    assert "shared_prompt_batches" not in packed


def test_sharing_is_off_when_packed_or_sharded(monkeypatch):
    """Packing has no attention mask to share under, and a decoder called twice in one forward is untested under
    parameter sharding: DeepSpeed or FSDP, given as flags or by an Accelerate config's environment."""
    from types import SimpleNamespace

    from sqltune.train.shared_prefix import prompt_sharing

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    cfg = SimpleNamespace(share_prompt_prefix=True, packing=False, deepspeed="", fsdp="")
    assert prompt_sharing(cfg)
    assert not prompt_sharing(SimpleNamespace(**{**vars(cfg), "share_prompt_prefix": False}))
    assert not prompt_sharing(SimpleNamespace(**{**vars(cfg), "packing": True}))
    assert not prompt_sharing(SimpleNamespace(**{**vars(cfg), "deepspeed": "ds.json"}))
    assert not prompt_sharing(SimpleNamespace(**{**vars(cfg), "fsdp": "full_shard"}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not prompt_sharing(cfg)
