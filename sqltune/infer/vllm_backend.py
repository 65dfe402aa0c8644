"""The vLLM backend, on a GPU or with vLLM's CPU build (`make install-vllm`): all remaining prompts in one `generate`
call, which vLLM batches continuously; the same prompts (token ids) and stop tokens as the transformers backend.

Memory: on a GPU vLLM gives the KV cache what the model leaves of --gpu_memory_utilization; on a CPU that flag is a
share of all RAM for model and cache together (vLLM's 0.9 default never starts beside anything else), so there the
cache gets a fixed size, --kv_cache_gb (4 GiB by default), passed as vLLM's kv_cache_memory_bytes. vLLM's engine
runs in spawned worker processes: a Python script calling predict(backend="vllm") needs `if __name__ == "__main__":`."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from sqltune.config import PredictConfig
from sqltune.errors import SqltuneError
from sqltune.io import environ_set, logging_to_file, read_json

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig accepts only these max_lora_rank values
CPU_STEP_TOKENS = 4096  # vLLM's own CPU default for one step's tokens (its LLM class, one worker)
CPU_KV_CACHE_GB = 4  # in float32: ~170k tokens of Qwen2.5-0.5B's KV cache, ~37k of Qwen2.5-7B's
CPU_KV_BLOCK = 32  # tokens per KV block on a CPU: its attention kernel takes multiples of 32; vLLM's own is 128
FEW_CPUS = 4  # up to this many CPUs, vLLM's automatic binding would leave a quarter or more of them idle


def check_vllm(cfg: PredictConfig, model: Path | None = None) -> None:
    """vLLM importable, the KV cache's size settled and, on a CPU, RAM for it and `model`'s weights (checked before
    any output is touched). A broken install (native parts built for another torch) raises OSError or RuntimeError,
    not ImportError: one line too."""
    try:
        from vllm import LLM, SamplingParams  # noqa: F401
    except ImportError:
        raise SqltuneError("--backend vllm needs vLLM: pip install 'sqltune[gpu]' on a GPU, `make install-vllm` "
                           "(its CPU build, in .venv-vllm) on a CPU") from None
    except Exception as exc:
        text = " ".join(str(exc).split())[:300]
        raise SqltuneError(f"--backend vllm: vLLM is installed but does not load: {type(exc).__name__}: {text}") \
            from None
    on_cpu = vllm_on_cpu()
    kv = kv_cache_bytes(cfg, on_cpu)
    kv_block_size(cfg, on_cpu)  # a size the CPU cannot take: refused before any output is touched
    if on_cpu and model is not None:
        check_ram(kv if kv is not None else int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) << 30, model, available_ram())


def available_ram() -> int | None:
    """Bytes of RAM the kernel can give without swapping (MemAvailable); None where /proc/meminfo is not."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_ram(kv_bytes: int, model: Path, available: int | None) -> None:
    """On a CPU vLLM holds the weights and the KV cache in RAM. With less available its engine stops after loading
    the model, in an error pages long (a `sqltune run` whose SFT step kept 20 GB met it): one line before instead.
    The weights count at their size on disk, a floor (float32 from bfloat16 files takes twice that)."""
    if available is None:
        return
    from sqltune.loading import saved_weights_bytes

    weights = saved_weights_bytes(model)
    if available < kv_bytes + weights:
        gib = 1 << 30
        raise SqltuneError(f"vLLM on the CPU needs at least {(kv_bytes + weights) / gib:.1f} GiB of RAM here (the "
                           f"model's weights {weights / gib:.1f} GiB, the KV cache {kv_bytes / gib:g} GiB), and "
                           f"{available / gib:.1f} GiB are available: lower --kv_cache_gb, or free memory")


def vllm_on_cpu() -> bool:
    """Whether vLLM runs on the CPU: its platform says so; without it (a stand-in module), no CUDA means the CPU."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        import torch

        return not torch.cuda.is_available()


def kv_cache_bytes(cfg: PredictConfig, on_cpu: bool) -> int | None:
    """The KV cache's size for vLLM (None: vLLM's own sizing). On a CPU vLLM replaces any size with
    VLLM_CPU_KVCACHE_SPACE (GiB) when that is set, so the variable decides unless --kv_cache_gb says otherwise,
    which is refused rather than silently overridden."""
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") if on_cpu else ""
    if env:
        try:
            env_gb = int(env)
        except ValueError:
            raise SqltuneError(f"VLLM_CPU_KVCACHE_SPACE must be a whole number of GiB, not {env!r}") from None
        if cfg.kv_cache_gb and not math.isclose(cfg.kv_cache_gb, env_gb):
            raise SqltuneError(f"VLLM_CPU_KVCACHE_SPACE={env} (GiB) overrides --kv_cache_gb {cfg.kv_cache_gb:g} in "
                               "vLLM's CPU build; unset one of them")
        return env_gb << 30 if cfg.kv_cache_gb else None
    gb = cfg.kv_cache_gb or (CPU_KV_CACHE_GB if on_cpu else 0)
    return int(gb * (1 << 30)) if gb else None


def kv_block_size(cfg: PredictConfig, on_cpu: bool) -> int:
    """Tokens per KV block for vLLM (0: vLLM's own, on a GPU). On a CPU 32, the smallest its attention takes: vLLM's
    128 shared a ~400-token schema between questions only up to 256 of its tokens in the prefix cache."""
    if on_cpu and cfg.kv_block_size % CPU_KV_BLOCK:
        raise SqltuneError(f"--kv_block_size must be a multiple of {CPU_KV_BLOCK} on a CPU (vLLM's CPU attention "
                           f"takes no other), not {cfg.kv_block_size}")
    return cfg.kv_block_size or (CPU_KV_BLOCK if on_cpu else 0)


def cpu_threads_env(on_cpu: bool, environ=None, cpus: list[int] | None = None) -> dict[str, str]:
    """Environment for vLLM's CPU engine to compute on every CPU of a small machine. Left to itself (binding `auto`)
    vLLM reserves one CPU for its scheduler process and binds the model's threads to the others: on this project's
    2-core machine the model ran on one core. Up to FEW_CPUS CPUs, sqltune binds the threads to all of them instead;
    a VLLM_CPU_OMP_THREADS_BIND or VLLM_CPU_NUM_OF_RESERVED_CPU the user set wins, and bigger machines keep vLLM's
    own binding (per NUMA node, one thread per physical core)."""
    environ = os.environ if environ is None else environ
    if not on_cpu or "VLLM_CPU_OMP_THREADS_BIND" in environ or "VLLM_CPU_NUM_OF_RESERVED_CPU" in environ:
        return {}
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not 1 < len(cpus) <= FEW_CPUS:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus))}


def cpu_compile_env(on_cpu: bool, environ=None) -> dict[str, str]:
    """Environment for vLLM's CPU engine to load its compiled model from the cache. By default vLLM 0.32 with torch
    2.13 saves an AOT artifact it cannot load again (`'function' object has no attribute 'finalize_loading'`), so
    every compiled start compiled again: 69 s for Qwen2.5-0.5B here, 41 s with its older cache (AOT off), which
    loads. A VLLM_USE_AOT_COMPILE the user set wins; a GPU keeps vLLM's default (not measured there)."""
    environ = os.environ if environ is None else environ
    return {"VLLM_USE_AOT_COMPILE": "0"} if on_cpu and "VLLM_USE_AOT_COMPILE" not in environ else {}


def cpu_engine_env(on_cpu: bool) -> dict[str, str]:
    """What sqltune sets for vLLM's engine processes on a CPU (they inherit it): threads and compile cache."""
    return {**cpu_threads_env(on_cpu), **cpu_compile_env(on_cpu)}


def vllm_engine_args(cfg: PredictConfig, model: Path, adapter: Path | None) -> dict:
    """Keyword arguments of `vllm.LLM`: parallelism, memory (the KV cache sized on a CPU, in blocks of 32 tokens
    there) and length limits, dtype, eager mode, prefix caching, and LoRA sized from the adapter (vLLM's default max_lora_rank 16 rejects r=64)."""
    on_cpu = vllm_on_cpu()
    dtype = cfg.dtype if cfg.dtype != "auto" else "float32" if on_cpu else "bfloat16"  # as the hf backend's auto
    args = dict(model=str(model), seed=cfg.seed, dtype=dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                enable_prefix_caching=True,  # a vote's greedy and n samples (and questions on one schema) share blocks
                max_model_len=cfg.max_model_len or cfg.max_source_length + cfg.max_new_tokens)
    block = kv_block_size(cfg, on_cpu)
    if block:
        args["block_size"] = block
    if on_cpu:
        # whole prompts per step: a seeded request prefilled over several steps rewinds its torch Generator, and the
        # CPU build's generators have no offset (`CPU Generator does not use offset` killed every vote whose prompts
        # passed one step's token budget); a step must then hold the longest prompt
        args.update(enable_chunked_prefill=False,
                    max_num_batched_tokens=max(args["max_model_len"], CPU_STEP_TOKENS))
    size = kv_cache_bytes(cfg, on_cpu)
    if size is not None:
        args["kv_cache_memory_bytes"] = size
    if adapter is not None:
        rank = read_json(adapter / "adapter_config.json").get("r")
        if not isinstance(rank, int) or rank <= 0:
            raise SqltuneError(f"{adapter}/adapter_config.json has no LoRA rank `r`")
        fits = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not fits:
            raise SqltuneError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; {adapter} has r={rank}")
        args.update(enable_lora=True, max_loras=1, max_lora_rank=fits[0])
    return args


class _CarriedInterrupt(BaseException):
    """A KeyboardInterrupt (Ctrl-C, or the Terminated sqltune's SIGTERM handler raises) on its way through vLLM."""


@contextmanager
def interrupts_reach_us():
    """Ctrl-C and SIGTERM stop a vLLM call. vLLM's engine start swallows KeyboardInterrupt (its `zmq_socket_ctx`
    logs it at debug level and goes on), so a SIGTERM or Ctrl-C while the engine started was lost and the run went
    on generating. Inside this block the signal handlers' KeyboardInterrupt travels as an exception no `except
    KeyboardInterrupt` catches, and leaves the block as itself. Handlers that do not raise (SIG_IGN: a nohup'd
    Ctrl-C) are left alone; off the main thread there are no handlers to wrap."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wrapped = {sig: handler for sig in (signal.SIGINT, signal.SIGTERM) if callable(handler := signal.getsignal(sig))}
    for sig, handler in wrapped.items():
        signal.signal(sig, _carrying(handler))
    try:
        yield
    except _CarriedInterrupt as carried:
        raise carried.args[0] from None
    finally:
        for sig, handler in wrapped.items():
            signal.signal(sig, handler)


def _carrying(handler):
    def on_signal(signum, frame):
        try:
            handler(signum, frame)
        except KeyboardInterrupt as exc:
            raise _CarriedInterrupt(exc) from None
    return on_signal


class LogLines:
    """What vLLM's `use_tqdm` calls, printing sqltune's progress lines (sqltune.progress) in a log file. vLLM makes
    one over the answers of a `generate` call (its total counts each of a request's `n` outputs: a vote's sampled
    request is n; `update(n)` once per finished request), reads `format_dict["elapsed"]`, sets `postfix` to its
    token rates; and wraps the prompts it renders (an iterable, passed through: rendering is quick)."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", **_):
        from sqltune.progress import Progress

        self.iterable, self.n = iterable, 0
        self.progress = None if iterable is not None else Progress(int(total or 0), "generate", "answers")
        self.started = time.monotonic()

    def __iter__(self):
        return iter(self.iterable)

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.monotonic() - self.started, 1e-9)}

    @property
    def postfix(self) -> str:
        return self.progress.text if self.progress else ""

    @postfix.setter
    def postfix(self, text: str) -> None:
        if self.progress:
            self.progress.text = str(text).replace("est. speed ", "")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.progress:
            self.progress.update(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.progress:
            self.progress.close()


class VLLMGenerator:
    """vLLM (GPU or CPU build), for throughput; same prompts (token ids) and stop tokens as the HF path. predict hands it all
    remaining prompts at once, so vLLM schedules them continuously."""

    def __init__(self, cfg: PredictConfig, tokenizer, template, model: Path, adapter: Path | None):
        from vllm import LLM, SamplingParams

        from sqltune.templates import stop_token_ids

        self.tokenizer, self.template = tokenizer, template
        with environ_set(cpu_engine_env(vllm_on_cpu())), interrupts_reach_us():  # spawned processes inherit the env
            self.llm = LLM(**vllm_engine_args(cfg, model, adapter))
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter))
        self.cfg, self.sampling = cfg, SamplingParams
        # vLLM's own bar on a terminal; in a log file (where a bar shows its first frame alone) progress lines as
        # every stage prints them, so a long generate call is not silent there; nothing with --quiet
        self.bar = False if cfg.quiet else LogLines if logging_to_file() else True
        self.stop = stop_token_ids(tokenizer, template, _generation_config(model))
        self.params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed, stop_token_ids=self.stop)

    def generate(self, prompts: list[list[int]]) -> list[tuple[str, int]]:
        with interrupts_reach_us():
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params,
                                     lora_request=self.lora, use_tqdm=self.bar)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]

    def candidates(self, prompts: list[list[int]], n: int, include_greedy: bool, end: str | None) -> list[list[dict]]:
        """Greedy and sampled candidates of every prompt in one `generate` call (a SamplingParams per request);
        logprobs=0 makes vLLM fill cumulative_logprob (of the model's distribution, before temperature)."""
        from sqltune.infer.vote import make_candidate, sampling_temperature

        common = dict(max_tokens=self.cfg.max_new_tokens, stop_token_ids=self.stop, seed=self.cfg.seed, logprobs=0)
        kinds = ([("greedy", self.sampling(temperature=0.0, **common))] if include_greedy else []) + \
            ([("sample", self.sampling(n=n, temperature=sampling_temperature(self.cfg.temperature),
                                       top_p=self.cfg.top_p, **common))] if n else [])
        requests = [({"prompt_token_ids": p}, params) for _, params in kinds for p in prompts]
        with interrupts_reach_us():
            outs = self.llm.generate([r for r, _ in requests], [params for _, params in requests],
                                     lora_request=self.lora, use_tqdm=self.bar)
        rows: list[list[dict]] = [[] for _ in prompts]
        for k, (source, _) in enumerate(kinds):
            for row, out in zip(rows, outs[k * len(prompts):(k + 1) * len(prompts)]):
                row += [make_candidate(o.text, o.cumulative_logprob, source, len(o.token_ids), end)
                        for o in out.outputs]
        return rows


def _generation_config(model: Path):
    path = model / "generation_config.json"
    return read_json(path) if path.is_file() else None

