"""The merge stage: fold a LoRA adapter into its base model and save a plain model folder.

The base is loaded unquantised in the dtype it was saved in (never the 4-bit copy a QLoRA run trained against, never
widened to float32), on the GPU when it fits there, the adapter's weights are added in, and the result is saved as safetensors with tokenizer and generation config, so that
`AutoModelForCausalLM.from_pretrained(out)` loads it without peft.

The model is saved into a temporary folder beside `out` and renamed into place. One merge per `out`: it holds
`<out>.lock` (a second gets one line naming the holder), so the temporary folders of an earlier merge of the same
`out` that was killed are stale, and are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from sqltune.config import MergeConfig
from sqltune.errors import SqltuneError
from sqltune.io import refuse_overlap, swap_in, temp_dir
from sqltune.lock import held
from sqltune.loading import attach_adapter, check_adapter, gpu_device_map, load_model, load_tokenizer, resolve


def adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on, as peft recorded it in adapter_config.json."""
    from sqltune.io import read_json

    base = read_json(adapter / "adapter_config.json").get("base_model_name_or_path") or ""
    if not base:
        raise SqltuneError(f"{adapter}/adapter_config.json names no base model: pass --model_name_or_path")
    return base


def temp_prefix(out: Path) -> str:
    return f".{out.name}.merging-"


def clear_stale(out: Path) -> None:
    """Remove the temporary folders a killed merge of `out` left beside it (ours: the caller holds the lock); the
    names of earlier versions (`.<out>.` and mkdtemp's 8 characters) too."""
    legacy = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}")
    for folder in out.parent.iterdir() if out.parent.is_dir() else []:
        if (folder.name.startswith(temp_prefix(out)) or legacy.fullmatch(folder.name)) and \
                folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def merge(cfg: MergeConfig) -> dict:
    import torch

    adapter = check_adapter(cfg.adapter)
    base = resolve(cfg.model_name_or_path or adapter_base(adapter))
    out = Path(os.path.abspath(cfg.out))
    refuse_overlap(out, {"base model folder": base, "adapter folder": adapter}, "out", "merge")
    with held(out.with_name(out.name + ".lock"), f"another merge is writing {out}",
              "wait for it to finish or choose another --out"):
        if out.exists() and any(out.iterdir()) and not cfg.overwrite_output_dir:
            raise SqltuneError(f"{cfg.out} exists and is not empty (pass --overwrite_output_dir to replace it)")
        clear_stale(out)
        base_config = json.loads((base / "config.json").read_text())
        saved_dtype = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
        # in the base's own dtype (a 34B bf16 base is never held in float32: ~136 GB), on the GPU when it fits there
        model = attach_adapter(load_model(base, None, dtype=getattr(torch, saved_dtype, torch.float32),
                                          device_map=gpu_device_map(base)), adapter)
        merged = model.merge_and_unload()
        tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base)
        save(merged, tokenizer, base, adapter, out)
    return {"out": str(Path(cfg.out)), "params": sum(p.numel() for p in merged.parameters()), "dtype": saved_dtype}


def save(merged, tokenizer, base: Path, adapter: Path, out: Path) -> None:
    """Save the merged model into a temporary folder beside `out` (the umask's mode, not mkdtemp's 0700) and swap
    it in as one unit."""
    tmp = temp_dir(out.parent, temp_prefix(out))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if merged.generation_config is not None:
            merged.generation_config.save_pretrained(tmp)
        (tmp / "sqltune_merge.json").write_text(json.dumps({"base": str(base.resolve()),
                                                            "adapter": str(adapter.resolve())}, indent=2))
        if (adapter / "sqltune_train.yaml").is_file():  # the prompt format travels with the model (predict reads it)
            shutil.copy2(adapter / "sqltune_train.yaml", tmp / "sqltune_train.yaml")
        swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
