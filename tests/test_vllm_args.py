"""The vLLM backend's arguments, with a stand-in `vllm` module (no GPU here), and the hf backend's attention
choice (issue #15 §1 and §7)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from sqltune.cli import main
from sqltune.config import PredictConfig
from sqltune.errors import SqltuneError
from sqltune.infer.predict import predict


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` package recording what sqltune asks of it; torch sees a GPU."""
    import torch

    calls = {"llm": [], "params": [], "generate": [], "lora": []}

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"].append(kwargs)

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            calls["generate"].append({"prompts": prompts, "params": params, "lora_request": lora_request})
            outs = []
            for p in params if isinstance(params, list) else [params] * len(prompts):
                if "logprobs" not in p:  # a plain greedy request
                    answers = [("SELECT count(*) FROM t", None)]
                elif p["temperature"] == 0:  # the vote's greedy candidate, which fails to run
                    answers = [("SELECT nothing FROM nowhere", -1.0)]
                else:  # samples: 2 = 1 + 1 is the largest group
                    answers = [("SELECT 3", -0.5), ("SELECT 1 + 1", -2.0), ("SELECT 2", -1.5)][:p["n"]]
                outs.append(types.SimpleNamespace(outputs=[
                    types.SimpleNamespace(text=t, token_ids=[1, 2, 3], cumulative_logprob=lp) for t, lp in answers]))
            return outs

    def sampling_params(**kwargs):
        calls["params"].append(kwargs)
        return kwargs

    def lora_request(*args):
        calls["lora"].append(args)
        return args

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, sampling_params
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lora_request
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def _adapter(folder, rank, base):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": str(base),
                                                            "peft_type": "LORA"}))
    return folder


def test_vllm_gets_its_settings_and_all_prompts_in_one_call(tiny_model, prepared_demo, tmp_path, fake_vllm):
    """Pins: tensor_parallel_size, gpu_memory_utilization, max_model_len and dtype never reached vLLM; an r=64
    adapter was rejected by vLLM's default max_lora_rank 16; prompts went in one `generate` call per batch_size
    chunk, so vLLM could not batch continuously."""
    adapter = _adapter(tmp_path / "adapter", 64, tiny_model)
    figures = predict(PredictConfig(model_name_or_path=str(tiny_model), adapter=str(adapter), dataset="demo_dev",
                                    dataset_dir=str(prepared_demo), out=str(tmp_path / "v.sql"), template="chatml",
                                    backend="vllm", batch_size=4, tensor_parallel_size=2, gpu_memory_utilization=0.5,
                                    max_model_len=2048, dtype="bfloat16", max_new_tokens=16))
    (llm,) = fake_vllm["llm"]
    assert llm["model"] == str(tiny_model)
    assert llm["tensor_parallel_size"] == 2 and llm["gpu_memory_utilization"] == 0.5
    assert llm["max_model_len"] == 2048 and llm["dtype"] == "bfloat16"
    assert llm["enable_lora"] is True and llm["max_lora_rank"] == 64
    assert len(fake_vllm["generate"]) == 1 and len(fake_vllm["generate"][0]["prompts"]) == 30
    assert fake_vllm["lora"] == [("adapter", 1, str(adapter))]
    (params,) = fake_vllm["params"]
    assert params["max_tokens"] == 16 and params["stop_token_ids"]
    assert figures["generated"] == 30
    assert (tmp_path / "v.sql").read_text().splitlines() == ["SELECT count(*) FROM t"] * 30


def test_vllm_rank_rounds_up_and_length_defaults(tiny_model, prepared_demo, tmp_path, fake_vllm):
    """Pins: a rank vLLM does not list (r=12) must be served with the next rank it accepts (16); with no
    --max_model_len the engine is sized for prompt + answer, not the model's whole context."""
    adapter = _adapter(tmp_path / "a12", 12, tiny_model)
    predict(PredictConfig(model_name_or_path=str(tiny_model), adapter=str(adapter), dataset="demo_dev",
                          dataset_dir=str(prepared_demo), out=str(tmp_path / "w.sql"), template="chatml",
                          backend="vllm", max_samples=3, max_source_length=300, max_new_tokens=20))
    (llm,) = fake_vllm["llm"]
    assert llm["max_lora_rank"] == 16 and llm["max_model_len"] == 320 and llm["dtype"] == "bfloat16"


def test_num_beams_with_vllm_is_one_line(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: --num_beams 4 with --backend vllm was silently ignored (vLLM's generate has no beam search)."""
    with pytest.raises(SqltuneError, match="num_beams"):
        PredictConfig(backend="vllm", num_beams=4)
    assert main(["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
                 str(prepared_demo), "--out", str(tmp_path / "o" / "b.sql"), "--backend", "vllm", "--num_beams",
                 "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num_beams" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model(tiny_model, prepared_demo, tmp_path, monkeypatch, attn):
    """Pins: predict had no --attn_implementation; the model was always loaded with transformers' default."""
    from sqltune import loading

    seen = {}
    original = loading.load_model

    def recording(*args, **kwargs):
        seen["model"] = model = original(*args, **kwargs)
        return model

    monkeypatch.setattr(loading, "load_model", recording)
    predict(PredictConfig(model_name_or_path=str(tiny_model), dataset="demo_dev", dataset_dir=str(prepared_demo),
                          out=str(tmp_path / "a.sql"), template="chatml", max_samples=2, max_new_tokens=4,
                          attn_implementation=attn))
    assert seen["model"].config._attn_implementation == attn


def test_flash_attention_without_the_package_is_refused_first(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: an attention kernel that cannot load must be one line before any output file exists."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    assert main(["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
                 str(prepared_demo), "--out", str(tmp_path / "o" / "f.sql"), "--attn_implementation",
                 "flash_attention_2"]) == 2
    assert "flash_attn" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_vllm_vote_asks_for_every_candidate_in_one_call(tiny_model, prepared_demo, tmp_path, fake_vllm):
    """Pins: --vote execution with vLLM: greedy and sampled candidates of all prompts go in one `generate` call
    (n samples per request, log-probabilities asked for), and the vote's winner is written."""
    predict(PredictConfig(model_name_or_path=str(tiny_model), dataset="demo_dev", dataset_dir=str(prepared_demo),
                          out=str(tmp_path / "v.sql"), template="chatml", backend="vllm", max_samples=4,
                          num_samples=3, vote="execution", temperature=0.0))
    (call,) = fake_vllm["generate"]
    assert len(call["prompts"]) == 8 and call["prompts"][:4] == call["prompts"][4:]
    greedy, sample = call["params"][0], call["params"][4]
    assert greedy["temperature"] == 0.0 and greedy["logprobs"] == 0
    assert sample["n"] == 3 and sample["temperature"] == 0.7 and sample["logprobs"] == 0
    assert (tmp_path / "v.sql").read_text().splitlines() == ["SELECT 2"] * 4
    raw = json.loads((tmp_path / "v.sql.raw.jsonl").read_text().splitlines()[0])
    assert [c["logprob"] for c in raw["vote"]["candidates"]] == [-1.0, -0.5, -2.0, -1.5]
