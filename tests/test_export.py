"""`sqltune export --format gguf` (issue 27 item 6): a tiny random Llama with SmolLM2's tokenizer (one llama.cpp's
converter knows), with and without a LoRA adapter, through llama.cpp's own convert_hf_to_gguf.py, read back with
gguf.GGUFReader and loaded by transformers, its logits compared with the source model's; the Ollama Modelfile's stop
lines and its Go template (run here as Ollama runs it) against training's prompts; the one-line failures and what a
failed export leaves (nothing but its log).

The converter comes from the llama-cpp-python sdist on PyPI, fetched once into $SQLTUNE_HOME/tools by `make install`
(or by the first test that needs it); with SQLTUNE_NO_DOWNLOAD=1 and no cached copy those tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sqltune.cli import main
from sqltune.errors import SqltuneError
from sqltune.testing import FAMILIES, build_chat_tokenizer

CORPUS = ["SELECT name FROM singer WHERE age > 3", "how many singers are there?", "You are a helpful assistant"] * 5


@pytest.fixture(scope="module")
def tool():
    from sqltune.infer.converter import converter, downloads_off

    try:
        return converter()
    except SqltuneError as exc:
        if downloads_off():
            pytest.skip(f"llama.cpp's converter is not cached and downloads are off: {exc}")
        raise


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random Llama (hidden 64, 2 layers, untied output) with SmolLM2-135M-Instruct's tokenizer files."""
    from sqltune.catalog import fetch
    from sqltune.testing import build_tiny_llama_like

    return build_tiny_llama_like(tmp_path_factory.mktemp("tiny") / "model", fetch("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A LoRA adapter of `tiny` with random (not zero) B matrices, so that merging it changes the logits, and the
    training record naming the template (chatml), as `sqltune train` writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora") / "adapter"
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                      init_lora_weights=False))
    model.save_pretrained(out)
    (out / "sqltune_train.yaml").write_text("template: chatml\nmax_source_length: 300\n")
    return out


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _prompt_ids(tiny: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    return tok("<|im_start|>user\nHow many singers are there?<|im_end|>\n<|im_start|>assistant\nSELECT",
               add_special_tokens=False)["input_ids"]


def _expected_tensors(layers: int) -> set[str]:
    per_block = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
    return {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(layers) for name in per_block}


def _read_back(path: Path) -> tuple[str, set[str]]:
    import gguf

    reader = gguf.GGUFReader(path)
    return reader.get_field("general.architecture").contents(), {t.name for t in reader.tensors}


def _no_leftovers(folder: Path, name: str) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") or p.name == f"{name}.lock"]
    assert not left, left


# ------------------------------------------------------------------------------------------- the round trip
def test_an_adapter_is_merged_and_the_gguf_gives_the_merged_models_logits(tool, tiny, adapter, tmp_path, capsys):
    """export --adapter: the GGUF holds the merged model (every tensor, llama architecture) and transformers loads
    it to the logits of base + adapter (f16 tolerance), not the base's; the Modelfile carries the trained template
    (chatml, from the adapter's training record), every stop string of it, temperature 0."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqltune.templates import get_template, stop_strings

    out = tmp_path / "gguf" / "tiny.gguf"
    assert main(["export", "--model_name_or_path", str(tiny), "--adapter", str(adapter), "--format", "gguf",
                 "--out", str(out), "--outtype", "f16", "--modelfile"]) == 0
    printed = capsys.readouterr().out
    assert "architecture=llama" in printed and "tensors=21" in printed and "template=chatml" in printed
    architecture, names = _read_back(out)
    assert architecture == "llama" and names == _expected_tensors(2)

    ids = _prompt_ids(tiny)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    want = _logits(PeftModel.from_pretrained(base, str(adapter)).merge_and_unload(), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32), ids)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), ids)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 2e-3 * scale
    assert (base_logits - want).abs().max().item() > 0.05 * scale  # the adapter mattered: a base export would fail

    text = (out.parent / "Modelfile").read_text()
    tok = AutoTokenizer.from_pretrained(tiny)
    generation = json.loads((tiny / "generation_config.json").read_text())
    stops = [json.loads(m) for m in re.findall(r'^PARAMETER stop (".*")$', text, re.M)]
    assert stops == stop_strings(tok, get_template("chatml", tok), generation) and "<|im_end|>" in stops
    assert re.findall(r"^FROM (.*)$", text, re.M) == ["./tiny.gguf"]
    assert re.findall(r"^PARAMETER temperature (.*)$", text, re.M) == ["0"]
    _no_leftovers(out.parent, out.name)
    assert not (out.parent / "tiny.gguf.convert.log").exists()


def test_a_plain_model_in_bf16_and_a_link_at_out_is_replaced_not_followed(tool, tiny, tmp_path):
    """export without an adapter, in the default bf16: the logits of the source within bf16's tolerance. --out is a
    link to another file and --overwrite is given: the link is replaced by the GGUF, the file it pointed to is
    untouched."""
    import torch
    from transformers import AutoModelForCausalLM

    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    out = tmp_path / "model.gguf"
    out.symlink_to(victim)
    assert main(["export", "--model_name_or_path", str(tiny), "--out", str(out), "--overwrite"]) == 0
    assert not out.is_symlink() and victim.read_text() == "not yours"
    assert _read_back(out)[1] == _expected_tensors(2)
    assert not (tmp_path / "Modelfile").exists()
    ids = _prompt_ids(tiny)
    want = _logits(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32), ids)
    assert (got - want).abs().max().item() < 2e-2 * want.abs().max().item()
    _no_leftovers(tmp_path, out.name)


def test_q8_0_writes_8_bit_matrices(tool, tiny, tmp_path):
    """--outtype q8_0: the weight matrices are Q8_0 in the file (norms stay F32, as llama.cpp keeps them)."""
    import gguf

    out = tmp_path / "q8.gguf"
    assert main(["export", "--model_name_or_path", str(tiny), "--out", str(out), "--outtype", "q8_0"]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert set(types) == _expected_tensors(2)
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_a_model_the_converter_rejects_is_one_line_and_leaves_only_its_log(tool, tiny_model, tmp_path, capsys):
    """The tiny model of the other tests has a BPE tokenizer trained on the fly, whose pre-tokenizer llama.cpp does
    not know: one line with the converter's reason and where its output is; no --out, no temporary folder."""
    out = tmp_path / "x.gguf"
    assert main(["export", "--model_name_or_path", str(tiny_model), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("export: converting") and len(lines) == 2  # the progress line, then the error
    err = lines[1]
    assert err.startswith("sqltune export: error: llama.cpp's converter failed")
    assert "pre-tokenizer was not recognized" in err and str(out) + ".convert.log" in err
    assert not out.exists() and (tmp_path / "x.gguf.convert.log").is_file()
    _no_leftovers(tmp_path, out.name)


# ------------------------------------------------------------------------------------------- one-line errors
def _one_line(capsys, *argv) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sqltune export: error: "), err
    return err


def test_bad_input_is_one_line(tiny_model, tmp_path, capsys):
    """No model, a missing model folder, an unknown format or outtype, no --out, --out a folder, and an --out (or
    Modelfile) that exists without --overwrite: one line each, nothing written (none needs the converter)."""
    out = str(tmp_path / "m.gguf")
    assert "--model_name_or_path is required" in _one_line(capsys, "--out", out)
    assert "model folder not found" in _one_line(capsys, "--model_name_or_path", str(tmp_path / "nope"), "--out", out)
    assert "unknown format 'onnx'" in _one_line(capsys, "--model_name_or_path", str(tiny_model), "--format", "onnx",
                                                "--out", out)
    assert "--outtype must be one of bf16, f16, q8_0" in _one_line(capsys, "--model_name_or_path", str(tiny_model),
                                                                   "--outtype", "q4", "--out", out)
    assert "--out is required" in _one_line(capsys, "--model_name_or_path", str(tiny_model))
    assert "is a folder" in _one_line(capsys, "--model_name_or_path", str(tiny_model), "--out", str(tmp_path))
    Path(out).write_text("old")
    assert "exists (pass --overwrite" in _one_line(capsys, "--model_name_or_path", str(tiny_model), "--out", out)
    assert Path(out).read_text() == "old"
    os.unlink(out)
    (tmp_path / "Modelfile").write_text("old")
    assert "Modelfile exists" in _one_line(capsys, "--model_name_or_path", str(tiny_model), "--out", out,
                                           "--modelfile", "--template", "chatml")
    assert not Path(out).exists()


def test_no_cached_converter_and_downloads_off_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    """An empty cache ($SQLTUNE_HOME) with SQLTUNE_NO_DOWNLOAD=1: one line saying so and how to get it."""
    monkeypatch.setenv("SQLTUNE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("SQLTUNE_NO_DOWNLOAD", "1")
    err = _one_line(capsys, "--model_name_or_path", str(tiny_model), "--out", str(tmp_path / "m.gguf"))
    assert "llama.cpp's converter is not in" in err and "downloads are off" in err and "make install" in err
    assert main(["export", "--fetch_converter"]) == 2
    assert not (tmp_path / "m.gguf").exists() and not list((tmp_path / "empty").rglob("convert_hf_to_gguf.py"))


def test_the_sdist_gives_up_only_the_converters_plain_files(tmp_path):
    """Extraction keeps convert_hf_to_gguf.py, conversion/ and gguf-py/gguf/ of the vendored llama.cpp as plain
    files: a link, a path with '..', an absolute path or anything else in the archive is never written."""
    import io
    import tarfile

    from sqltune.infer import converter as conv

    sdist = tmp_path / conv.SDIST
    inside = conv.INSIDE
    with tarfile.open(sdist, "w:gz") as tar:
        def add(name, data=b"x", kind=tarfile.REGTYPE, target=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, target, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add(f"{inside}/convert_hf_to_gguf.py", b"print('hi')")
        add(f"{inside}/conversion/llama.py")
        add(f"{inside}/gguf-py/gguf/__init__.py")
        add(f"{inside}/gguf-py/gguf/evil.py", kind=tarfile.SYMTYPE, target="/etc/passwd")
        add(f"{inside}/conversion/../../../../escape.py")
        add("/abs/escape.py")
        add(f"{inside}/src/llama.cpp")
        add(f"{inside}/conversion/__pycache__/x.pyc")
    out = tmp_path / "out"
    conv._extract(sdist, out)
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink())
    assert kept == ["conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not any(p.is_symlink() for p in out.rglob("*")) and not (tmp_path / "escape.py").exists()


# ------------------------------------------------------------------------------------------- the Ollama template
def _ollama(template: str, values: dict, cut: bool) -> str:
    """The Go template as Ollama runs a plain (.System/.Prompt/.Response) one: text, {{ .X }}, {{ "lit" }} and
    {{ if .X }}..{{ else }}..{{ end }}; with `cut`, the output stops at the top-level {{ .Response }} (Ollama's
    template.go drops what follows it for the question being answered)."""
    out, stack = [], []  # stack of (condition value, in else branch)
    for token in re.split(r"({{.*?}})", template, flags=re.S):
        if not token.startswith("{{"):
            if all(on != in_else for on, in_else in stack):
                out.append(token)
            continue
        action = token[2:-2].strip()
        live = all(on != in_else for on, in_else in stack)
        if action.startswith("if "):
            stack.append((bool(values[action[3:].strip().lstrip(".")]), False))
        elif action == "else":
            stack[-1] = (stack[-1][0], True)
        elif action == "end":
            stack.pop()
        elif action.startswith('"'):
            out.append(json.loads(action) if live else "")
        else:
            field = action.lstrip(".")
            if cut and field == "Response" and not stack:
                break
            out.append(values[field] if live else "")
    return "".join(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_ollama_template_gives_the_training_prompt_ids(family):
    """A conversation (system, question, answer, question) as Ollama renders the Modelfile's template, with the bos
    the engine adds when the GGUF says so, is the prompt training encodes, token for token: named, default and auto
    templates (messages without surrounding spaces: Ollama cannot strip them)."""
    from sqltune.infer.modelfile import go_template
    from sqltune.templates import encode_prompt, get_template

    tok, _ = build_chat_tokenizer(family, CORPUS)
    adds_bos = FAMILIES[family][5]
    turns = [("q1", "SELECT 1")]
    for name in (family, "default", "auto"):
        template = get_template(name, tok)
        go, system = go_template(template, tok, adds_bos)
        text = _ollama(go, {"System": system, "Prompt": "q1", "Response": "SELECT 1"}, cut=False)
        text += _ollama(go, {"System": "", "Prompt": "schema\nthe question", "Response": ""}, cut=True)
        got = ([tok.bos_token_id] if adds_bos else []) + tok(text, add_special_tokens=False)["input_ids"]
        want, _ = encode_prompt(tok, template, {"instruction": "schema\n", "input": "the question", "history": turns},
                                10_000)
        assert got == want, (family, name, text)
        first = _ollama(go, {"System": system, "Prompt": "the question", "Response": ""}, cut=True)
        want, _ = encode_prompt(tok, template, {"instruction": "", "input": "the question"}, 10_000)
        assert ([tok.bos_token_id] if adds_bos else []) + tok(first, add_special_tokens=False)["input_ids"] == want


def test_text_that_looks_like_an_action_is_escaped():
    """A template whose text holds `{{` keeps it as text in the Go template (else Ollama would read an action)."""
    import dataclasses

    from sqltune.infer.modelfile import go_template
    from sqltune.templates import TEMPLATES

    tok, _ = build_chat_tokenizer("chatml", CORPUS)
    odd = dataclasses.replace(TEMPLATES["default"], user="{{{{Q}}}} {content}\nA: ")
    go, system = go_template(odd, tok, False)
    assert _ollama(go, {"System": system, "Prompt": "q", "Response": ""}, cut=True) == odd.render(tok, [], "q")
