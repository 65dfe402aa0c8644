"""The vLLM backend (GPU only): all remaining prompts in one `generate` call, which vLLM batches continuously; the
same prompts (token ids) and stop tokens as the transformers backend."""

from __future__ import annotations

from pathlib import Path

from sqltune.config import PredictConfig
from sqltune.errors import SqltuneError
from sqltune.io import read_json

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig accepts only these max_lora_rank values


def check_vllm() -> None:
    """vLLM importable and a CUDA GPU present (checked before any output is touched)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SqltuneError("--backend vllm needs vLLM (GPU only): pip install 'sqltune[gpu]'") from None
    import torch

    if not torch.cuda.is_available():
        raise SqltuneError("--backend vllm needs a CUDA GPU; use --backend hf on this machine")


def vllm_engine_args(cfg: PredictConfig, model: Path, adapter: Path | None) -> dict:
    """Keyword arguments of `vllm.LLM`: parallelism, memory and length limits, dtype, and LoRA sized from the
    adapter (vLLM's default max_lora_rank 16 rejects an r=64 adapter)."""
    args = dict(model=str(model), seed=cfg.seed, dtype="float32" if cfg.dtype == "float32" else "bfloat16",
                tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.max_model_len or cfg.max_source_length + cfg.max_new_tokens)
    if adapter is not None:
        rank = read_json(adapter / "adapter_config.json").get("r")
        if not isinstance(rank, int) or rank <= 0:
            raise SqltuneError(f"{adapter}/adapter_config.json has no LoRA rank `r`")
        fits = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not fits:
            raise SqltuneError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; {adapter} has r={rank}")
        args.update(enable_lora=True, max_loras=1, max_lora_rank=fits[0])
    return args


class VLLMGenerator:
    """vLLM on a GPU, for throughput; same prompts (token ids) and stop tokens as the HF path. predict hands it all
    remaining prompts at once, so vLLM schedules them continuously."""

    def __init__(self, cfg: PredictConfig, tokenizer, template, model: Path, adapter: Path | None):
        from vllm import LLM, SamplingParams

        from sqltune.templates import stop_token_ids

        self.tokenizer, self.template = tokenizer, template
        self.llm = LLM(**vllm_engine_args(cfg, model, adapter))
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter))
        self.cfg, self.sampling = cfg, SamplingParams
        self.stop = stop_token_ids(tokenizer, template, _generation_config(model))
        self.params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed, stop_token_ids=self.stop)

    def generate(self, prompts: list[list[int]]) -> list[tuple[str, int]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params, lora_request=self.lora,
                                 use_tqdm=True)
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
        outs = self.llm.generate([r for r, _ in requests], [params for _, params in requests],
                                 lora_request=self.lora, use_tqdm=True)
        rows: list[list[dict]] = [[] for _ in prompts]
        for k, (source, _) in enumerate(kinds):
            for row, out in zip(rows, outs[k * len(prompts):(k + 1) * len(prompts)]):
                row += [make_candidate(o.text, o.cumulative_logprob, source, len(o.token_ids), end)
                        for o in out.outputs]
        return rows


def _generation_config(model: Path):
    path = model / "generation_config.json"
    return read_json(path) if path.is_file() else None

