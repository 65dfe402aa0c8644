"""The command line: one table from command name to stage. Only this module knows about flags.

    sqltune <command> [config.yaml] [--name value ...]

Every stage takes one typed config (sqltune/config.py); a YAML file gives values (for `run` files, the stage's
own section), and `--name value` flags override them. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
import time
from importlib import import_module

from sqltune import __version__
from sqltune.config import EvalConfig, MergeConfig, PredictConfig, PrepareConfig, TrainConfig, help_lines, load
from sqltune.errors import SqltuneError

# command -> (one-line summary, config class, "module:function", YAML section)
STAGES = {
    "prepare": ("turn a Spider/BIRD/SParC/CoSQL folder into supervised records", PrepareConfig,
                "sqltune.data.prepare:prepare", "prepare"),
    "train": ("fine-tune a model (LoRA, QLoRA, freeze, full) on prepared records", TrainConfig,
              "sqltune.train.sft:train", "train"),
    "merge": ("fold a LoRA adapter into a plain model folder", MergeConfig, "sqltune.infer.merge:merge", "merge"),
    "predict": ("write one SQL per prepared record, batched and resumable", PredictConfig,
                "sqltune.infer.predict:predict", "predict"),
    "evaluate": ("Spider execution and exact-match accuracy per hardness", EvalConfig,
                 "sqltune.eval.evaluate:evaluate", "evaluate"),
}
OTHER = {
    "run": "run prepare -> train -> merge -> predict -> evaluate from one YAML file",
    "trace": "list runs and show each stage's timing and figures",
    "models": "list and fetch the catalog of real models (no model hub needed)",
    "demo-data": "generate the embedded Spider-layout demo dataset",
}


def usage() -> str:
    lines = [f"sqltune {__version__}: turn an open causal LLM into a Text-to-SQL model", "",
             "usage: sqltune <command> [config.yaml] [--option value ...]", "", "stages:"]
    lines += [f"  {name:<10} {spec[0]}" for name, spec in STAGES.items()]
    lines += ["", "other commands:"] + [f"  {name:<10} {text}" for name, text in OTHER.items()]
    lines += ["", "`sqltune <command> --help` lists a command's options."]
    return "\n".join(lines)


def parse_flags(argv: list[str]) -> tuple[list[str], dict]:
    """Split argv into positionals and `--name value` / `--name=value` / bare `--flag` (true) options."""
    positional, options = [], {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            name = token[2:]
            if "=" in name:
                name, value = name.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
            options[name.replace("-", "_")] = value
        else:
            positional.append(token)
        i += 1
    return positional, options


def stage_function(command: str):
    """The function behind a stage command (imported only when needed, so `--help` stays fast)."""
    module, func = STAGES[command][2].split(":")
    return getattr(import_module(module), func)


def print_figures(command: str, figures) -> None:
    if not isinstance(figures, dict):
        return
    shown = {k: v for k, v in figures.items() if not isinstance(v, (dict, list)) or k == "missing_databases"}
    if shown:
        print(f"{command}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def run_stage(command: str, argv: list[str]) -> int:
    summary, cls, _, section = STAGES[command]
    positional, options = parse_flags(argv)
    if options.pop("help", None) or "-h" in positional:
        print(f"usage: sqltune {command} [config.yaml] [--option value ...]\n\n{summary}\n\noptions:")
        print("\n".join(help_lines(cls)))
        return 0
    if len(positional) > 1:
        raise SqltuneError(f"expected at most one config file, got {' '.join(positional)}")
    cfg = load(cls, positional[0] if positional else None, options, section=section)
    from sqltune.trace import command_span

    with command_span(command, cfg) as span:
        figures = stage_function(command)(cfg)
        span.update(figures if isinstance(figures, dict) else {})
    if command != "evaluate":
        print_figures(command, figures)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    started = time.time()
    try:
        if command in STAGES:
            return run_stage(command, rest)
        if command == "run":
            from sqltune.pipeline import main as run_main
            return run_main(rest)
        if command == "trace":
            from sqltune.trace import main as trace_main
            return trace_main(rest)
        if command == "models":
            from sqltune.models import main as models_main
            return models_main(rest)
        if command == "demo-data":
            from sqltune.data.demo import main as demo_main
            return demo_main(rest)
        raise SqltuneError(f"unknown command {command!r}; `sqltune --help` lists the commands")
    except SqltuneError as exc:
        print(f"sqltune {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sqltune {command}: interrupted after {time.time() - started:.0f} s", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line unless debugging
        if os.environ.get("SQLTUNE_DEBUG"):
            raise
        print(f"sqltune {command}: internal error: {type(exc).__name__}: {exc} (SQLTUNE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
