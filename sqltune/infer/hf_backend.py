"""The transformers backend: batched generation on CPU or GPU, the default of predict (and the backend of `ask`).
Decoding follows the options given, never a checkpoint's own sampling settings (only_token_ids)."""

from __future__ import annotations

from sqltune.config import PredictConfig


def _torch_dtype(cfg: PredictConfig, gpu: bool):
    import torch

    return {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[cfg.dtype]


def only_token_ids(model) -> None:
    """Keep only the token ids of the model's generation_config. generate() fills every option it is not given from
    there, so a checkpoint's repetition_penalty (Qwen2.5 instruct models ship 1.05-1.1), top_k or
    no_repeat_ngram_size would silently change "greedy" answers and the samples and log-probabilities of a vote,
    and the vLLM backend, which decodes as the options say, would give other figures for the same model."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(**{k: getattr(saved, k, None) for k in
                                                  ("bos_token_id", "eos_token_id", "pad_token_id")})


class HFGenerator:
    """Batched generation with transformers: left padding, greedy unless temperature > 0."""

    def __init__(self, cfg: PredictConfig, tokenizer=None, template=None):
        import torch

        from sqltune.loading import attach_adapter, check_adapter, load_model, load_tokenizer, resolve
        from sqltune.templates import get_template, stop_token_ids

        path = resolve(cfg.model_name_or_path)
        self.tokenizer = tokenizer or load_tokenizer(path)
        self.template = template or get_template(cfg.template or "auto", self.tokenizer)
        gpu = torch.cuda.is_available()
        model = load_model(path, None, dtype=_torch_dtype(cfg, gpu), device_map="auto" if gpu else None,
                           attn_implementation=cfg.attn_implementation)
        if cfg.adapter:
            model = attach_adapter(model, check_adapter(cfg.adapter))
        self.model = model.eval()
        self.cfg = cfg
        self.stop = stop_token_ids(self.tokenizer, self.template, self.model.generation_config)
        only_token_ids(self.model)
        torch.manual_seed(cfg.seed)

    def generate(self, prompts: list[list[int]]) -> list[tuple[str, int]]:
        import torch

        pad = self.tokenizer.pad_token_id
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        device = next(self.model.parameters()).device
        sample = self.cfg.temperature > 0
        kwargs = dict(max_new_tokens=self.cfg.max_new_tokens, num_beams=self.cfg.num_beams, do_sample=sample,
                      eos_token_id=self.stop or None, pad_token_id=pad)
        kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p) if sample else \
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        results = []
        for row in out[:, longest:]:
            keep = row.tolist()
            n = len(keep)
            for j, tok in enumerate(keep):
                if tok in self.stop or tok == pad:
                    n = j
                    break
            results.append((self.tokenizer.decode(keep[:n], skip_special_tokens=True), n))
        return results

    def candidates(self, prompts: list[list[int]], n: int, include_greedy: bool, end: str | None) -> list[list[dict]]:
        """Per prompt: the greedy candidate (when asked) then n samples, with their log-probabilities."""
        from sqltune.infer.vote import generate_candidates

        return generate_candidates(self.model, self.tokenizer, prompts, self.stop, n, self.cfg.temperature,
                                   self.cfg.top_p, include_greedy, self.cfg.max_new_tokens, end=end)

