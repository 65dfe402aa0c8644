"""The predict stage: one SQL per prepared record, in record order, batched and resumable.

Prompts are encoded by the same code as in training (sqltune.templates), cut the same way when too long. Each
batch's lines go to the output with a single append; raw generations go to `<out>.raw.jsonl` first. An interrupted
run restarts where it stopped: the finished lines are kept (checked by count against the raw file, and against
`<out>.meta.json`, which says which dataset and model they came from) and a torn last line is dropped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from sqltune.config import PredictConfig, to_dict
from sqltune.data.registry import lookup
from sqltune.errors import SqltuneError
from sqltune.infer.extract import extract_sql
from sqltune.io import append_once, read_jsonl, write_json


def side_files(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".raw.jsonl"), out.with_name(out.name + ".meta.json")


def _complete_lines(path: Path) -> int:
    """Number of newline-terminated lines; a torn last line is cut off the file."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return data[:end].count(b"\n")


def _truncate_lines(path: Path, n: int) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    pos = 0
    for _ in range(n):
        pos = data.index(b"\n", pos) + 1
    with open(path, "r+b") as handle:
        handle.truncate(pos)


def resume_point(out: Path, meta: dict, overwrite: bool) -> int:
    """How many records already have their line; clears files of another run only when asked."""
    raw, meta_path = side_files(out)
    if out.exists() and not overwrite:
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if old != meta:
            raise SqltuneError(f"{out} holds predictions of another run (dataset, model or generation settings "
                               "differ); pass --overwrite to start again")
        n = min(_complete_lines(out), _complete_lines(raw))
        _truncate_lines(out, n)
        _truncate_lines(raw, n)
        return n
    for path in (out, raw):
        if path.exists():
            path.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, meta)
    out.touch()
    raw.touch()
    return 0


def _append(path: Path, lines: list[str]) -> None:
    """One write call per batch, so a crash leaves whole lines (a torn tail is repaired on resume)."""
    append_once(path, "".join(line + "\n" for line in lines), sync=True)


class HFGenerator:
    """Batched generation with transformers: left padding, greedy unless temperature > 0."""

    def __init__(self, cfg: PredictConfig):
        import torch

        from sqltune.infer.merge import attach_adapter, check_adapter
        from sqltune.loading import load_model, load_tokenizer, resolve
        from sqltune.templates import get_template, stop_token_ids

        path = resolve(cfg.model_name_or_path)
        self.tokenizer = load_tokenizer(path)
        self.template = get_template(cfg.template, self.tokenizer)
        gpu = torch.cuda.is_available()
        dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16}[cfg.dtype]
        model = load_model(path, None, dtype=dtype, device_map="auto" if gpu else None)
        if cfg.adapter:
            model = attach_adapter(model, check_adapter(cfg.adapter))
        self.model = model.eval()
        self.cfg = cfg
        self.stop = stop_token_ids(self.tokenizer, self.template, self.model.generation_config)
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


class VLLMGenerator:
    """vLLM on a GPU, for throughput; same prompts (token ids) and stop tokens as the HF path."""

    def __init__(self, cfg: PredictConfig):
        try:
            import torch
            from vllm import LLM, SamplingParams
        except ImportError:
            raise SqltuneError("--backend vllm needs vLLM (GPU only): pip install 'sqltune[gpu]'") from None
        if not torch.cuda.is_available():
            raise SqltuneError("--backend vllm needs a CUDA GPU; use --backend hf on this machine")
        from sqltune.loading import load_tokenizer, resolve
        from sqltune.templates import get_template, stop_token_ids

        path = resolve(cfg.model_name_or_path)
        self.tokenizer = load_tokenizer(path)
        self.template = get_template(cfg.template, self.tokenizer)
        self.llm = LLM(model=str(path), enable_lora=bool(cfg.adapter), seed=cfg.seed)
        self.lora = None
        if cfg.adapter:
            from vllm.lora.request import LoRARequest
            self.lora = LoRARequest("adapter", 1, cfg.adapter)
        self.params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                     stop_token_ids=stop_token_ids(self.tokenizer, self.template))

    def generate(self, prompts: list[list[int]]) -> list[tuple[str, int]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params, lora_request=self.lora,
                                 use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]


def predict(cfg: PredictConfig) -> dict:
    from sqltune.templates import encode_prompt

    if not cfg.dataset:
        raise SqltuneError("--dataset is required (a registry name such as spider_dev)")
    entry = lookup(cfg.dataset_dir, cfg.dataset)
    records = list(read_jsonl(entry["file_name"]))
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    if cfg.adapter:
        from sqltune.infer.merge import check_adapter
        check_adapter(cfg.adapter)
    out = Path(cfg.out)
    meta = {"dataset": cfg.dataset, "records": len(records), "file": str(Path(entry["file_name"]).resolve()),
            **{k: v for k, v in to_dict(cfg).items() if k not in ("out", "batch_size", "overwrite", "dataset_dir")}}
    done = resume_point(out, meta, cfg.overwrite)
    figures = {"records": len(records), "resumed_from": done, "generated": 0, "prompts_cut": 0}
    if done >= len(records):
        return figures
    gen = VLLMGenerator(cfg) if cfg.backend == "vllm" else HFGenerator(cfg)
    raw_path, _ = side_files(out)
    new_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(records), initial=done, desc="predict", unit="ex", dynamic_ncols=True)
    for first in range(done, len(records), cfg.batch_size):
        batch = records[first:first + cfg.batch_size]
        encoded = [encode_prompt(gen.tokenizer, gen.template, r, cfg.max_source_length) for r in batch]
        results = gen.generate([ids for ids, _ in encoded])
        sqls = [extract_sql(text, gen.template.end_marker(gen.tokenizer)) for text, _ in results]
        _append(raw_path, [json.dumps({"index": first + i, "db_id": r.get("db_id"), "raw": text, "sql": sql,
                                       "prompt_tokens": len(ids), "prompt_cut": cut, "new_tokens": n},
                                      ensure_ascii=False)
                           for i, (r, (text, n), sql, (ids, cut)) in enumerate(zip(batch, results, sqls, encoded))])
        _append(out, sqls)
        new_tokens += sum(n for _, n in results)
        figures["prompts_cut"] += sum(cut for _, cut in encoded)
        figures["generated"] += len(batch)
        bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - start
    figures.update(new_tokens=new_tokens, generation_s=round(elapsed, 2),
                   tokens_per_s=round(new_tokens / elapsed, 1), examples_per_s=round(figures["generated"] / elapsed, 3))
    return figures
