"""Loading models and tokenizers from a folder or a catalog name."""

from __future__ import annotations

import logging
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
    import sys

    if not sys.stderr.isatty():
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
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(path: Path, quantization_bit: int | None = None, dtype=None, device_map=None):
    """A causal LM; with quantization_bit, loaded in 4 or 8 bits through bitsandbytes."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype or torch.float32}
    if quantization_bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SqltuneError("QLoRA needs bitsandbytes: pip install 'sqltune[quant]'") from None
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
            if quantization_bit == 4 else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["dtype"] = compute
    if device_map:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
