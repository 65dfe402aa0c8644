"""`sqltune export --format gguf`: a tuned model as one GGUF file (llama.cpp, Ollama, LM Studio), and with
--modelfile an Ollama Modelfile beside it that carries the prompt format of training and its stop strings.

The weights are converted by llama.cpp's own convert_hf_to_gguf.py (sqltune.infer.converter), run as a child of this
Python; an adapter is merged first (sqltune.infer.merge). Everything is made in a temporary folder beside --out (the
merged model, the converter's file), the file is checked to be a GGUF and renamed into place only then: a failed or
killed export leaves the old --out as it was, and a link at --out is replaced, never written through. One export per
--out (`<out>.lock`); what a killed one left beside it is removed by the next.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from sqltune.config.settings import ExportConfig, MergeConfig
from sqltune.errors import SqltuneError
from sqltune.io import atomic_write, read_json, refuse_overlap, temp_dir
from sqltune.lock import held

MODELFILE = "Modelfile"
_FACTS = """import json, sys
import gguf
reader = gguf.GGUFReader(sys.stdin.read())  # the path comes on stdin
def get(key):
    field = reader.get_field(key)
    return None if field is None else field.contents()
print(json.dumps({"architecture": get("general.architecture"), "tensors": len(reader.tensors),
                  "add_bos": get("tokenizer.ggml.add_bos_token")}))
"""


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.exporting-"


def _clear_stale(out: Path) -> None:
    """Remove the temporary folders a killed export of `out` left beside it (ours: the caller holds the lock)."""
    for folder in out.parent.iterdir() if out.parent.is_dir() else []:
        if folder.name.startswith(_temp_prefix(out)) and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def _last_error(log: str) -> str:
    """The line of the converter's output that says why it stopped (its exception, else its last line)."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", x)]
    return ((errors or lines or ["no output"])[-1])[:300]


def convert(tool: Path, model: Path, target: Path, outtype: str, log: Path) -> None:
    """Run llama.cpp's converter on the model folder into `target`. Its output goes to a file beside `target`; when
    it fails, that file is kept as `log` and named in the error line."""
    from sqltune.infer.converter import SCRIPT, environment

    argv = [sys.executable, str(tool / SCRIPT), str(model), "--outfile", str(target), "--outtype", outtype]
    output = target.with_name(target.name + ".log")
    with open(output, "w", encoding="utf-8") as handle:
        proc = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=environment(tool), cwd=str(target.parent))
    text = output.read_text(errors="replace")
    if proc.returncode == 0 and target.is_file():
        with open(target, "rb") as handle:
            if handle.read(4) == b"GGUF":
                if os.path.lexists(log):  # the output of an earlier failed export of this --out: now stale
                    os.unlink(log)
                return
    with atomic_write(log) as handle:
        handle.write(text)
    why = _last_error(text) if proc.returncode != 0 else "it wrote no GGUF file"
    raise SqltuneError(f"llama.cpp's converter failed on {model}: {why} (its output: {log})")


def gguf_facts(tool: Path, path: Path) -> dict:
    """Architecture, tensor count and whether the engine adds a bos token, read with the converter's own gguf."""
    from sqltune.infer.converter import environment

    proc = subprocess.run([sys.executable, "-c", _FACTS], input=str(path), capture_output=True, text=True,
                          env=environment(tool))
    if proc.returncode != 0:
        raise SqltuneError(f"cannot read back {path.name}: {_last_error(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _modelfile_parts(cfg: ExportConfig, model: Path, adapter: Path | None):
    """(template, tokenizer, stop strings, source text) of the Modelfile: checked before the long work starts."""
    from sqltune.infer.prompt_format import prompt_settings, training_record
    from sqltune.loading import load_tokenizer
    from sqltune.templates import get_template, stop_strings

    trained, where = training_record(model, adapter)
    name, _ = prompt_settings(SimpleNamespace(template=cfg.template, max_source_length=0), trained, where,
                              who="export")
    tokenizer = load_tokenizer(adapter if adapter and (adapter / "tokenizer_config.json").is_file() else model)
    template = get_template(name, tokenizer)
    generation = read_json(model / "generation_config.json") if (model / "generation_config.json").is_file() else {}
    if not isinstance(generation, dict):
        raise SqltuneError(f"{model}/generation_config.json must hold a JSON object")
    source = f"{model}" + (f" with adapter {adapter}" if adapter else "")
    return template, tokenizer, stop_strings(tokenizer, template, generation), source


def export(cfg: ExportConfig) -> dict:
    from sqltune.infer.converter import converter, missing_modules
    from sqltune.infer.merge import adapter_base, merge
    from sqltune.infer.modelfile import go_template, modelfile
    from sqltune.loading import check_adapter, resolve

    adapter = check_adapter(cfg.adapter) if cfg.adapter else None
    model = resolve(cfg.model_name_or_path or adapter_base(adapter))
    out = Path(os.path.abspath(cfg.out))
    refuse_overlap(out, {"model folder": model, **({"adapter folder": adapter} if adapter else {})}, "out", "export")
    if out.is_dir() and not out.is_symlink():
        raise SqltuneError(f"--out {cfg.out} is a folder: give the file to write, e.g. {Path(cfg.out) / 'model.gguf'}")
    lacking = missing_modules()
    if lacking:
        raise SqltuneError(f"llama.cpp's converter needs {', '.join(lacking)}, which this Python lacks: "
                           "pip install 'sqltune[gguf]' (or `make install`)")
    modelfile_path = out.parent / MODELFILE if cfg.modelfile else None
    parts = _modelfile_parts(cfg, model, adapter) if modelfile_path else None
    if parts:
        go_template(parts[0], parts[1], add_bos=False)  # a template Ollama cannot carry fails now, not after converting
    out.parent.mkdir(parents=True, exist_ok=True)
    with held(out.with_name(out.name + ".lock"), f"another export is writing {out}",
              "wait for it to finish or choose another --out"):
        for path in (out, modelfile_path):
            if path is not None and os.path.lexists(path) and not cfg.overwrite:
                raise SqltuneError(f"{path} exists (pass --overwrite to replace it)")
        tool = converter()
        _clear_stale(out)
        started = time.time()
        work = temp_dir(out.parent, _temp_prefix(out))
        try:
            source = model
            if adapter is not None:
                print(f"export: merging {adapter} into {model}", file=sys.stderr)
                merge(MergeConfig(model_name_or_path=str(model), adapter=str(adapter), out=str(work / "merged")))
                source = work / "merged"
            print(f"export: converting {source} to {cfg.outtype} GGUF with llama.cpp's convert_hf_to_gguf.py",
                  file=sys.stderr)
            written = work / out.name
            convert(tool, source, written, cfg.outtype, out.with_name(out.name + ".convert.log"))
            facts = gguf_facts(tool, written)
            text = None
            if parts:
                template, tokenizer, stops, what = parts
                text = modelfile(out.name, template, tokenizer, bool(facts.get("add_bos")), stops, what)
            os.replace(written, out)
            if text is not None:
                with atomic_write(modelfile_path) as handle:
                    handle.write(text)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    figures = {"out": str(Path(cfg.out)), "format": cfg.format, "outtype": cfg.outtype,
               "architecture": facts.get("architecture"), "tensors": facts.get("tensors"),
               "mb": round(out.stat().st_size / 1e6, 1), "seconds": round(time.time() - started, 1)}
    if modelfile_path is not None:
        figures["modelfile"] = str(modelfile_path)
        figures["template"] = parts[0].name
    return figures
