"""Loading models and tokenizers from a folder or a catalog name."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from sqltune.errors import SqltuneError

# Known third-party noise, silenced once for every stage that loads a model: peft imports bitsandbytes whenever it is
# installed, whose CPU backend then warns about an optional kernel package on every run (even for plain LoRA).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def quiet_progress_in_logs() -> None:
    """In a log file (stderr not a terminal) carriage-return progress bars show only their first frame: turn off
    transformers' loading bars there; stages print their own progress lines."""
    from sqltune.io import logging_to_file

    if logging_to_file():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def resolve(model_name_or_path: str) -> Path:
    """A model folder from a path or a catalog name (one clear line when neither)."""
    if not model_name_or_path:
        raise SqltuneError("--model_name_or_path is required (a model folder or a catalog name)")
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SqltuneError(f"{path} is not a model folder (no config.json)")
        return path
    from sqltune.catalog import ALIASES, CATALOG, fetch

    if model_name_or_path in CATALOG or model_name_or_path in ALIASES:
        return fetch(model_name_or_path)
    raise SqltuneError(f"model folder not found: {model_name_or_path} (nor a catalog name: "
                       f"{', '.join(CATALOG)})")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    quiet_progress_in_logs()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # no tokenizer files, or unreadable ones
        raise SqltuneError(f"cannot load a tokenizer from {path}: {str(exc).strip().splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


ATTENTION = ("sdpa", "flash_attention_2", "eager")


def check_attention(attn_implementation: str) -> None:
    """flash_attention_2 only when the flash_attn package is installed (one line otherwise, before any loading)."""
    import importlib.util

    if attn_implementation not in ATTENTION:
        raise SqltuneError(f"--attn_implementation must be one of {', '.join(ATTENTION)}, not {attn_implementation!r}")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise SqltuneError("--attn_implementation flash_attention_2 needs the flash_attn package (GPU): "
                           "pip install flash-attn, or use sdpa")


def no_cudnn_attention() -> None:
    """Turn PyTorch's cuDNN SDPA backend off when CUDA is present. It plans a kernel per sequence length, and training
    (batches padded to their own longest) and generation change length at every step: on one H100 this planning took
    63 % of training CPU time (issue #15). The flash / memory-efficient SDPA backends need no planning. Not measured in
    this repository's CPU-only sessions: a GPU run of benchmarks/train_throughput.py --device cuda must confirm it."""
    import torch

    if torch.cuda.is_available() and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def quantized_device_map(cuda: bool, env=None) -> dict | None:
    """Where a 4/8-bit model loads: under torchrun each process on its own GPU (LOCAL_RANK), never all on cuda:0."""
    import os

    if not cuda:
        return None
    env = os.environ if env is None else env
    return {"": int(env.get("LOCAL_RANK", 0))}


def load_model(path: Path, quantization_bit: int | None = None, dtype=None, device_map=None,
               attn_implementation: str | None = None):
    """A causal LM in `dtype` (default float32); with quantization_bit, loaded in 4 or 8 bits through bitsandbytes with
    `dtype` as the compute dtype. attn_implementation: sdpa, flash_attention_2 or eager (default: transformers')."""
    import torch
    from transformers import AutoModelForCausalLM

    no_cudnn_attention()
    kwargs: dict = {"dtype": dtype or torch.float32}
    if attn_implementation:
        check_attention(attn_implementation)
        kwargs["attn_implementation"] = attn_implementation
    if quantization_bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SqltuneError("QLoRA needs bitsandbytes: pip install 'sqltune[quant]'") from None
        from transformers import BitsAndBytesConfig

        compute = kwargs["dtype"]  # follows --bf16 / --fp16 (float32 without either)
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
            if quantization_bit == 4 else BitsAndBytesConfig(load_in_8bit=True))
        device_map = device_map or quantized_device_map(torch.cuda.is_available())
    if device_map:
        kwargs["device_map"] = device_map
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, SafetensorError) as exc:  # missing or corrupt weight files
        raise SqltuneError(f"cannot load the model weights in {path}: {str(exc).strip().splitlines()[0]}") from None


def saved_weights_bytes(path: Path) -> int:
    """Bytes of a model folder's weight files as saved: its safetensors, else its .bin files."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) or \
        sum(f.stat().st_size for f in Path(path).glob("*.bin"))


def gpu_device_map(path: Path, share: float = 0.9) -> dict | None:
    """{"": 0} when a CUDA GPU has room for the folder's weights (as saved), else None (CPU). Whole-model placement
    only: accelerate's spill-over to CPU/disk leaves weights on the meta device, which merging cannot touch."""
    import torch

    if not torch.cuda.is_available():
        return None
    size = saved_weights_bytes(path)
    free, _ = torch.cuda.mem_get_info(0)
    return {"": 0} if 0 < size < share * free else None


_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def check_adapter(adapter: str) -> Path:
    """The adapter folder `adapter` names; one line when it is missing or holds no adapter_config.json."""
    path = Path(adapter)
    if not path.is_dir():
        raise SqltuneError(f"adapter folder not found: {adapter}")
    if not (path / "adapter_config.json").is_file():
        raise SqltuneError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    return path


def attach_adapter(model, adapter: Path, trainable: bool = False):
    """A PeftModel (its adapter learning with `trainable`: DPO and GRPO going on from an SFT adapter); an adapter
    trained for another base is a one-line error, not a traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        text = str(exc)
        found = _MISMATCH.search(text)
        if found:
            name, got, want = found.groups()
            detail = f"{name} is {got} in the adapter but {want} in the model"
        else:
            detail = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SqltuneError(f"adapter {adapter} does not fit this base model: {detail}") from None
