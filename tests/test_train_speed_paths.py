"""Issue #15's CPU-testable parts: the label-only loss equals the model's own (value and LoRA gradients), packed and
unpacked batches give the same loss, bf16 LoRA on CPU reaches the fp32 loss, precision follows the flags, the
multi-GPU logic (LOCAL_RANK device map, the first-step gradient check under DeepSpeed/fp16, FSDP and ZeRO configs),
the attention choice, and the pre-flight memory estimate with numbers."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sqltune.config import TrainConfig
from sqltune.errors import SqltuneError
from sqltune.loading import load_model, load_tokenizer, quantized_device_map
from sqltune.templates import get_template
from sqltune.train import loss as loss_mod
from sqltune.train.data import Collator, load_records, tokenize_records
from sqltune.train.loss import install_label_only_loss, label_only_loss
from sqltune.train.memory import GIB, estimate, model_shape, preflight
from sqltune.train.setup import gradient_check, parallel_args, setup_trainable, train_dtype
from sqltune.train.sft import train

ROOT = Path(__file__).resolve().parents[1]


def lora_model(tiny_model, **load):
    """The tiny model with a LoRA on every linear layer whose B matrices are not zero (so gradients reach A too)."""
    cfg = TrainConfig(model_name_or_path=str(tiny_model), lora_rank=4, lora_dropout=0.0)
    torch.manual_seed(0)
    model = setup_trainable(load_model(tiny_model, **load), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def demo_batch(tiny_model, prepared_demo, n=4):
    tok = load_tokenizer(tiny_model)
    records = load_records(str(prepared_demo), "demo_train")[:n]
    dataset, _ = tokenize_records(records, tok, get_template("chatml", tok), 512, 64)
    return tok, [dataset[i] for i in range(len(dataset))]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("num_items", [None, 23])
def test_label_only_loss_equals_the_models_own_loss_and_gradients(tiny_model, prepared_demo, chunk, num_items):
    """The loss without full-vocabulary logits has the value and LoRA gradients of model(labels=...), whether it
    runs in one chunk or in several recomputed ones, averaged or divided by the Trainer's num_items_in_batch."""
    tok, features = demo_batch(tiny_model, prepared_demo)
    batch = Collator(tok.pad_token_id)(features)
    ref = lora_model(tiny_model)
    ours = copy.deepcopy(ref)
    assert install_label_only_loss(ours, chunk=chunk) == "chunked"
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected = ref(**batch, **extra).loss
    expected.backward()
    got = ours(**batch, **extra).loss
    got.backward()
    assert abs(got.item() - expected.item()) < 1e-5
    g_ref, g_ours = grads(ref), grads(ours)
    assert g_ref.keys() == g_ours.keys() and len(g_ref) > 0
    for name in g_ref:
        assert torch.allclose(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4), name


def test_label_only_loss_computes_logits_only_for_label_positions(tiny_model, prepared_demo, monkeypatch):
    """The output layer sees only the positions whose next token has a label (answers), never the whole batch."""
    tok, features = demo_batch(tiny_model, prepared_demo)
    batch = Collator(tok.pad_token_id)(features)
    model = lora_model(tiny_model)
    install_label_only_loss(model)
    rows = []
    head = model.get_base_model().lm_head
    head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    model(**batch)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [labelled] and labelled < batch["input_ids"].numel() / 3


def test_eval_mode_keeps_the_models_own_forward(tiny_model, prepared_demo):
    """Generation and evaluation (eval mode, or no labels) still get logits."""
    tok, features = demo_batch(tiny_model, prepared_demo, 2)
    batch = Collator(tok.pad_token_id)(features)
    model = lora_model(tiny_model)
    install_label_only_loss(model)
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == len(tok)
    model.eval()
    out = model(**batch)
    assert out.logits is not None and out.loss is not None


def test_an_empty_label_batch_is_a_zero_loss_not_nan():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    loss = label_only_loss(hidden, head, torch.full((2, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None


def test_softcapped_architectures_keep_their_own_loss(tiny_model):
    """Logits that are not plain lm_head(hidden) (Gemma's softcapping) keep the model's own loss."""
    model = lora_model(tiny_model)
    model.get_base_model().config.final_logit_softcapping = 30.0
    assert install_label_only_loss(model).startswith("model's own loss")


def test_liger_fused_loss_gets_the_label_rows(monkeypatch):
    """With liger-kernel installed (GPU), the fused linear cross-entropy gets the head's weight and only the label
    rows, summed, then divided like the model's own loss. A stand-in liger module checks the call."""
    calls = []

    class FusedLCE(torch.nn.Module):
        def __init__(self, reduction):
            super().__init__()
            assert reduction == "sum"

        def forward(self, weight, states, target, bias=None):
            calls.append((states.shape[0], target.tolist()))
            return torch.nn.functional.cross_entropy(states @ weight.T + bias, target, reduction="sum")

    fake = types.ModuleType("liger_kernel")
    fake.transformers = types.SimpleNamespace(LigerFusedLinearCrossEntropyLoss=FusedLCE)
    fake.__spec__ = types.SimpleNamespace(name="liger_kernel")
    monkeypatch.setitem(sys.modules, "liger_kernel", fake)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake.transformers)
    monkeypatch.setattr(loss_mod, "_on_gpu", lambda t: True)
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 6, 8), torch.nn.Linear(8, 13)
    labels = torch.full((2, 6), -100)
    labels[0, 3:] = torch.tensor([1, 2, 3])
    labels[1, 5] = 4
    got = label_only_loss(hidden, head, labels)
    chunked = label_only_loss(hidden, head, labels, use_liger=False)
    assert calls == [(4, [1, 2, 3, 4])] and abs(got.item() - chunked.item()) < 1e-6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("own_loss", [False, True])
def test_packed_and_unpacked_losses_are_equal(tiny_model, prepared_demo, attn, own_loss):
    """One packed row (position ids restarting per example, no attention mask) gives the loss of the same examples
    padded, so no example attends to another. Also with the model's own loss: the training forward never makes a KV
    cache, without which transformers builds the per-example mask (with a cache it silently attends across)."""
    tok, features = demo_batch(tiny_model, prepared_demo)
    model = lora_model(tiny_model, attn_implementation=attn)
    if own_loss:
        model.get_base_model().config.final_logit_softcapping = 1e9  # keeps the model's own loss path
    install_label_only_loss(model)
    padded = Collator(tok.pad_token_id)(features)
    packed = Collator(tok.pad_token_id, packing=True)(features)
    assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    assert "attention_mask" not in packed and packed["position_ids"][0, 0] == 0
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()
    with torch.no_grad():
        a, b = model(**padded).loss.item(), model(**packed).loss.item()
    assert abs(a - b) < 1e-4


def train_config(tiny_model, prepared_demo, out, **kw):
    values = {"model_name_or_path": str(tiny_model), "dataset": "demo_train", "dataset_dir": str(prepared_demo),
              "template": "chatml", "output_dir": str(out), "max_steps": 4, "logging_steps": 1, "save_steps": 100,
              "per_device_train_batch_size": 4, "learning_rate": 1e-3, "lora_dropout": 0.0, "max_samples": 16,
              "group_by_length": False}
    values.update(kw)
    return TrainConfig(**values)


def test_packing_trains_to_the_same_losses(tiny_model, prepared_demo, tmp_path):
    """`sqltune train --packing` takes the same steps with the same losses as padded batches, on the same tokens."""
    plain = train(train_config(tiny_model, prepared_demo, tmp_path / "plain", share_prompt_prefix=False))  # same order
    packed = train(train_config(tiny_model, prepared_demo, tmp_path / "packed", packing=True))
    assert plain["steps"] == packed["steps"] == 4
    assert plain["loss_kernel"] == "chunked"
    for key in ("first_loss", "final_loss", "train_loss"):
        assert abs(plain[key] - packed[key]) < 1e-3 * abs(plain[key]), key
    assert plain["tokens_seen"] == packed["tokens_seen"] == plain["train_tokens"]


def test_bf16_lora_on_cpu_reaches_the_fp32_loss(tiny_model, prepared_demo, tmp_path):
    """--bf16 on a CPU loads the base in bfloat16 (autocast for the rest) and ends near the float32 run's losses."""
    fast = {"learning_rate": 2e-2, "max_steps": 8, "max_samples": 32}  # the loss falls by ~0.3 in 8 steps
    fp32 = train(train_config(tiny_model, prepared_demo, tmp_path / "fp32", **fast))
    bf16 = train(train_config(tiny_model, prepared_demo, tmp_path / "bf16", bf16=True, **fast))
    for key in ("first_loss", "final_loss", "train_loss"):
        assert abs(fp32[key] - bf16[key]) < 0.01 * fp32[key], (key, fp32[key], bf16[key])
    assert fp32["final_loss"] < fp32["first_loss"] - 0.1 and bf16["final_loss"] < bf16["first_loss"] - 0.1


@pytest.mark.parametrize("kind,flags,expected", [
    ("lora", {}, torch.float32), ("lora", {"bf16": True}, torch.bfloat16), ("lora", {"fp16": True}, torch.float16),
    ("qlora", {"bf16": True}, torch.bfloat16), ("qlora", {"fp16": True}, torch.float16), ("qlora", {}, torch.float32),
    ("full", {"bf16": True}, torch.bfloat16), ("freeze", {"bf16": True}, torch.bfloat16),
    ("full", {"fp16": True}, torch.float32), ("freeze", {}, torch.float32)])
def test_weights_dtype_follows_the_precision_flags(kind, flags, expected):
    """--bf16 loads full/freeze in bfloat16 too (was float32); QLoRA's compute dtype follows --bf16/--fp16 (was
    bfloat16 on CUDA, float32 on CPU whatever the flags); fp16 full/freeze keep float32 weights for the scaler."""
    assert train_dtype(TrainConfig(finetuning_type=kind, **flags)) == expected


def test_full_finetune_with_bf16_loads_in_bf16(tiny_model):
    model = load_model(tiny_model, dtype=train_dtype(TrainConfig(finetuning_type="full", bf16=True)))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_compute_dtype_follows_the_flag(tiny_model, dtype):
    model = load_model(tiny_model, 4, dtype=dtype)
    assert model.config.quantization_config.bnb_4bit_compute_dtype == dtype


def test_quantized_models_load_on_each_process_gpu():
    """Under torchrun, process LOCAL_RANK=3 loads its 4-bit model on cuda:3 (before: every process on cuda:0)."""
    assert quantized_device_map(True, {"LOCAL_RANK": "3"}) == {"": 3}
    assert quantized_device_map(True, {}) == {"": 0}
    assert quantized_device_map(False, {"LOCAL_RANK": "3"}) is None


class Args(types.SimpleNamespace):
    deepspeed = None
    fsdp = None
    fp16 = False


def test_first_step_gradient_check_under_deepspeed_fsdp_and_fp16():
    """DeepSpeed's engine zeroes gradients before on_pre_optimizer_step and an FSDP rank may hold no gradient shard:
    the check is skipped there. An fp16 loss-scaler overflow step (non-finite gradients) is not a failure; a missing
    gradient still is."""
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), float("inf"))
    model.bias.grad = None
    assert gradient_check(Args(deepspeed="configs/deepspeed_zero2.json"), model) is None
    assert gradient_check(Args(fsdp=True), model) is None
    assert gradient_check(Args(fp16=True), model) == ["bias"]
    assert gradient_check(Args(), model) == ["weight", "bias"]
    model.bias.grad = torch.zeros(2)
    assert gradient_check(Args(fp16=True), model) == []


def test_fsdp_settings_reach_the_trainer(tmp_path):
    from transformers import TrainingArguments

    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}))
    cfg = TrainConfig(fsdp="full_shard auto_wrap", fsdp_config=str(config), bf16=True)
    values = parallel_args(cfg)
    assert values["fsdp"] == "full_shard auto_wrap" and values["fsdp_config"] == str(config) and values["bf16"]
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, **{**values, "bf16": False})
    assert args.fsdp and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert parallel_args(TrainConfig(fsdp="true"))["fsdp"] is True
    assert parallel_args(TrainConfig())["fsdp"] is None
    with pytest.raises(SqltuneError, match="one of --fsdp and --deepspeed"):
        TrainConfig(fsdp="true", deepspeed="configs/deepspeed_zero2.json")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_example_configs(stage):
    config = json.loads((ROOT / "configs" / f"deepspeed_zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"]["enabled"] == "auto"


def test_attention_implementation(tiny_model, monkeypatch):
    """sdpa by default; eager on request; flash_attention_2 without the flash_attn package is one line."""
    assert TrainConfig().attn_implementation == "sdpa"
    assert load_model(tiny_model, attn_implementation="eager").config._attn_implementation == "eager"
    with pytest.raises(SqltuneError, match="--attn_implementation must be"):
        TrainConfig(attn_implementation="flash")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(SqltuneError, match="needs the flash_attn package"):
        load_model(tiny_model, attn_implementation="flash_attention_2")


def test_cudnn_attention_is_turned_off_when_cuda_is_present(tiny_model, monkeypatch):
    """cuDNN SDPA re-plans per sequence length (63 % of training CPU time on an H100): off whenever CUDA is there."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    from sqltune.loading import no_cudnn_attention

    no_cudnn_attention()
    assert calls == [False]


# Qwen2.5-Coder sizes (config.json of the real models)
QWEN_05B = {"hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864, "vocab_size": 151936,
            "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}
QWEN_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944, "vocab_size": 152064,
           "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}


def test_memory_estimate_in_numbers():
    """Parameter counts within 2 % of the real models'; the 7B recipe at batch 8 x 2048 tokens without gradient
    checkpointing does not fit 80 GB (as measured on an H100: out of memory), with checkpointing it does; a 4-bit
    7B weighs 4-7 GiB; full fine-tuning carries two AdamW states per weight."""
    assert abs(model_shape(QWEN_05B)["params"] / 494.0e6 - 1) < 0.02
    assert abs(model_shape(QWEN_7B)["params"] / 7.616e9 - 1) < 0.02
    seven = model_shape(QWEN_7B)
    big = estimate(seven, "lora", None, 2, batch=8, seq_len=2048, lora_rank=64, lora_target="q_proj,v_proj")
    assert big["total"] > 80 * GIB and big["activations"] > big["weights"]
    ckpt = estimate(seven, "lora", None, 2, batch=8, seq_len=2048, lora_rank=64, lora_target="q_proj,v_proj",
                    gradient_checkpointing=True)
    assert 15 * GIB < ckpt["total"] < 40 * GIB
    assert ckpt["weights"] == 2 * seven["params"]
    q = estimate(seven, "qlora", 4, 2, batch=1, seq_len=1024, gradient_checkpointing=True)
    assert 4 * GIB < q["weights"] < 7 * GIB  # 4-bit decoder, bf16 embeddings and output layer
    full = estimate(seven, "full", None, 2, batch=1, seq_len=1024, gradient_checkpointing=True)
    assert full["optimizer"] == 4 * seven["params"] and full["total"] > 50 * GIB
    assert model_shape({"architectures": ["X"]}) is None


def test_preflight_warns_before_loading_and_names_the_flags_that_fit(tmp_path):
    """A recipe over the device's free memory is a warning line naming what would fit; one that fits says nothing."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B))
    cfg = TrainConfig(per_device_train_batch_size=8, max_source_length=1536, max_target_length=512, lora_rank=64,
                      lora_target="q_proj,v_proj", bf16=True)
    warning = preflight(cfg, tmp_path, 2, free=(78 * GIB, "GPU cuda:0 (H100)"))
    assert warning.startswith("warning: this recipe needs about") and "GPU cuda:0 (H100) has 78.0 GiB free" in warning
    assert "--gradient_checkpointing" in warning and "--per_device_train_batch_size 4 --gradient_accumulation_steps 2" in warning
    assert preflight(cfg, tmp_path, 2, free=(2000 * GIB, "GPU")) is None
    tiny = TrainConfig(per_device_train_batch_size=1, max_source_length=256, max_target_length=64)
    assert "even the smallest" in preflight(tiny, tmp_path, 4, free=(GIB, "CPU RAM"))
    assert preflight(cfg, tmp_path / "absent", 2, free=(GIB, "CPU RAM")) is None


def test_merge_works_in_the_base_dtype(tiny_model, tmp_path, monkeypatch):
    """merge loads a bf16 base in bf16 (it loaded float32 and cast afterwards: ~136 GB of RAM for a 34B model) and
    the merged weights equal base + the LoRA delta, within bf16 rounding."""
    from peft import LoraConfig, get_peft_model

    from sqltune.config import MergeConfig
    from sqltune.infer import merge as merge_mod

    base = tmp_path / "base"
    load_model(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    load_tokenizer(tiny_model).save_pretrained(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(base, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach()
    seen = []
    real = merge_mod.load_model
    monkeypatch.setattr(merge_mod, "load_model", lambda *a, **kw: seen.append(kw["dtype"]) or real(*a, **kw))
    merge_mod.merge(MergeConfig(model_name_or_path=str(base), adapter=str(tmp_path / "adapter"),
                                out=str(tmp_path / "merged")))
    assert seen == [torch.bfloat16]
    got = load_model(tmp_path / "merged", dtype=torch.bfloat16).model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected.float(), atol=2e-2, rtol=1e-2)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
