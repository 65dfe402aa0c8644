"""The command line: one table from command name to stage. Only this module knows about flags.

    sqltune <command> [config.yaml] [--name value ...]

Every stage takes one typed config (sqltune/config/); a YAML file gives values (for `run` files, the stage's
own section), and `--name value` flags override them. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from sqltune import __version__
from sqltune.config import help_lines, load, to_yaml
from sqltune.errors import SqltuneError
from sqltune.stages import STAGES

OTHER = {
    "run": "run prepare -> train -> merge -> predict -> evaluate from one YAML recipe",
    "trace": "list runs and show each stage's timing and figures",
    "models": "list and fetch the catalog of real models (no model hub needed)",
    "demo-data": "generate the embedded Spider-layout demo dataset",
    "ask": "ask a trained model a question about a SQLite file: its SQL and the result",
    "serve": "serve a tuned model with vLLM's OpenAI-compatible server (prints and runs its command)",
    "export": "write a tuned model as one GGUF file (llama.cpp's converter), with an Ollama Modelfile",
    "samples": "turn predict's sampled candidates on a train split into records and preference pairs",
}
USAGE = {
    "run": "usage: sqltune run RECIPE.yaml [--force] [--new] [--run_dir DIR] [--runs_dir DIR] [--print_config] "
           "[--train.max_steps N ...]",
    "trace": "usage: sqltune trace list [--runs_dir runs] [--json]\n       sqltune trace show RUN [--runs_dir runs] "
             "[--json | --html FILE]   (--html: write the run's page, report.html's content, to FILE)",
    "models": "usage: sqltune models list\n       sqltune models fetch NAME   (install, verify, convert once; "
              "prints the model folder)",
    "demo-data": "usage: sqltune demo-data --out DIR [--seed 0] [--train 400] [--dev 100]",
    "ask": "usage: sqltune ask --model_name_or_path M [--adapter A] --db FILE.sqlite [\"question\"] [--format json] "
           "[--max_rows N] [--num_samples N --vote execution] [--option value ...]\n\nWithout a question: one "
           "question per line from stdin until its end, the model loaded once.\n       sqltune ask ... "
           "--endpoint http://127.0.0.1:8000   (ask a running `sqltune serve` instead of loading the model)",
    "serve": "usage: sqltune serve --model_name_or_path M [--adapter A] [--port 8000] [--host 127.0.0.1] "
             "[--dry_run] [--option value ...]\n\nBuilds vLLM's `vllm serve` command for the model (the adapter as a "
             "LoRA module, the trained chat template and stop tokens), prints it and runs it.",
    "export": "usage: sqltune export --model_name_or_path M [--adapter A] --format gguf --out FILE.gguf "
              "[--outtype bf16|f16|q8_0] [--modelfile] [--overwrite]\n       sqltune export --fetch_converter   "
              "(fetch llama.cpp's converter once; prints its folder)\n\nMerges the adapter, converts with "
              "llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist, fetched once) and, with "
              "--modelfile, writes an Ollama Modelfile beside FILE with the trained prompt format and stop strings.",
    "samples": "usage: sqltune samples --samples PRED.sql.raw.jsonl --dataset NAME_train --dataset_dir DIR --name NEW "
               "[--max_per_question 4] [--max_pairs_per_question 4]\n\nScores every distinct candidate of "
               "`predict --num_samples N --vote execution` against the gold with EX's rules and writes NEW.jsonl "
               "(records of right candidates) and NEW_pairs.jsonl (right/wrong preference pairs for `train --stage "
               "dpo`), registered as NEW in DIR/dataset_info.json.",
}


def usage() -> str:
    lines = [f"sqltune {__version__}: turn an open causal LLM into a Text-to-SQL model", "",
             "usage: sqltune <command> [config.yaml] [--option value ...]", "", "stages:"]
    lines += [f"  {name:<10} {stage.summary}" for name, stage in STAGES.items()]
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


def print_figures(command: str, figures) -> None:
    if not isinstance(figures, dict):
        return
    shown = {k: v for k, v in figures.items() if not isinstance(v, (dict, list)) or k == "missing_databases"}
    if shown:
        print(f"{command}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def _flag(options: dict, key: str) -> bool:
    from sqltune.config.loading import _coerce

    return _coerce(key, options.pop(key, "false"), bool)


def _no_other_options(command: str, options: dict, known: list[str]) -> None:
    if options:
        raise SqltuneError(f"unknown option --{sorted(options)[0]} for `sqltune {command}` (known: "
                           f"{', '.join('--' + k for k in known) or 'none'})")


def run_stage(command: str, argv: list[str]) -> int:
    stage = STAGES[command]
    positional, options = parse_flags(argv)
    if options.pop("help", None) or "-h" in positional:
        print(f"usage: sqltune {command} [config.yaml] [--option value ...] [--print_config]\n\n{stage.summary}"
              "\n\nA config file may be a flat stage config or a run recipe (its shared keys and its "
              f"`{command}` section are read).\n\noptions:")
        print("\n".join(help_lines(stage.config)))
        return 0
    if len(positional) > 1:
        raise SqltuneError(f"expected at most one config file, got {' '.join(positional)}")
    show = _flag(options, "print_config")
    cfg = load(stage.config, positional[0] if positional else None, options, section=command)
    if show:
        print(to_yaml(cfg), end="")
        return 0
    from sqltune.trace import command_span

    with command_span(command, cfg) as span:
        figures = stage.run(cfg)
        span.update(figures if isinstance(figures, dict) else {})
    if command != "evaluate":
        print_figures(command, figures)
    return 0


def run_command(argv: list[str]) -> int:
    from sqltune.pipeline import run_recipe

    positional, options = parse_flags(argv)
    if not positional or options.pop("help", None):
        from sqltune import pipeline

        print(pipeline.__doc__.strip())
        return 0 if not positional else 2
    if len(positional) != 1:
        raise SqltuneError(f"expected one recipe file, got {' '.join(positional)}")
    force, new, show = _flag(options, "force"), _flag(options, "new"), _flag(options, "print_config")
    run_dir, root = options.pop("run_dir", None), options.pop("runs_dir", None)
    # what is left overrides the recipe: --train.max_steps 2 (one section), --model_name_or_path X (run level)
    run_recipe(positional[0], force=force, new=new, run_dir=run_dir, root=root, overrides=options, print_config=show)
    return 0


def trace_command(argv: list[str]) -> int:
    from pathlib import Path

    from sqltune.trace import print_run, print_runs, runs_dir

    positional, options = parse_flags(argv)
    if not positional or options.pop("help", None) or positional[0] not in ("list", "show"):
        print(USAGE["trace"])
        return 0 if not positional else 2
    root = Path(options.pop("runs_dir", None) or runs_dir())
    as_json = _flag(options, "json")
    html = options.pop("html", None)
    _no_other_options("trace", options, ["runs_dir", "json", "html"])
    if positional[0] == "list":
        if html is not None:
            raise SqltuneError("--html goes with `sqltune trace show RUN`, not `trace list`")
        print_runs(root, as_json)
        return 0
    if len(positional) != 2:
        raise SqltuneError("usage: sqltune trace show RUN [--json | --html FILE]")
    if html is not None:
        at = argv.index("--html") if "--html" in argv else -1
        bare = at >= 0 and (at + 1 == len(argv) or argv[at + 1].startswith("--"))  # parse_flags made it "true"
        if bare or not str(html).strip() or as_json:
            raise SqltuneError("--html takes the page's file name (sqltune trace show RUN --html FILE), without "
                               "--json")
        from sqltune.report.render import write_page
        from sqltune.trace import find_run

        print(f"wrote {write_page(find_run(root, positional[1]), Path(html))}")
        return 0
    print_run(root, positional[1], as_json)
    return 0


def models_command(argv: list[str]) -> int:
    from sqltune import catalog

    positional, options = parse_flags(argv)
    if not positional or options.pop("help", None) or positional[0] not in ("list", "fetch"):
        print(USAGE["models"])
        return 0 if not positional else 2
    _no_other_options("models", options, [])
    if positional[0] == "list":
        print("\n".join(catalog.describe()))
        return 0
    if len(positional) != 2:
        raise SqltuneError("usage: sqltune models fetch NAME")
    print(catalog.fetch(positional[1]))
    return 0


def demo_data_command(argv: list[str]) -> int:
    from sqltune.data.demo import generate

    _, options = parse_flags(argv)
    if options.pop("help", None) or "out" not in options:
        print(USAGE["demo-data"])
        return 0 if not options else 2
    out = options.pop("out")
    numbers = {}
    for key, default in (("seed", 0), ("train", 400), ("dev", 100)):
        text = options.pop(key, default)
        try:
            numbers[key] = int(text)
        except ValueError:
            raise SqltuneError(f"--{key} takes a whole number, not {text!r}") from None
    _no_other_options("demo-data", options, ["out", "seed", "train", "dev"])
    counts = generate(out, numbers["seed"], numbers["train"], numbers["dev"])
    print(f"demo-data: wrote {counts['databases']} databases, {counts['train']} train and {counts['dev']} dev "
          f"questions to {out}")
    return 0


def ask_command(argv: list[str]) -> int:
    from sqltune.config import AskConfig

    positional, options = parse_flags(argv)
    if options.pop("help", None) or "-h" in positional:
        print(USAGE["ask"] + "\n\noptions:")
        print("\n".join(help_lines(AskConfig)))
        return 0
    if positional:  # the question, quoted or not
        options["question"] = " ".join(positional)
    show = _flag(options, "print_config")
    cfg = load(AskConfig, None, options)
    if show:
        print(to_yaml(cfg), end="")
        return 0
    from sqltune.infer.ask import ask

    ask(cfg)
    return 0


def serve_command(argv: list[str]) -> int:
    from sqltune.config import ServeConfig

    positional, options = parse_flags(argv)
    if options.pop("help", None) or "-h" in positional:
        print(USAGE["serve"] + "\n\noptions:")
        print("\n".join(help_lines(ServeConfig)))
        return 0
    if positional:
        raise SqltuneError(f"serve takes no positional argument: {' '.join(positional)!r} (options are --option value)")
    show = _flag(options, "print_config")
    cfg = load(ServeConfig, None, options)
    if show:
        print(to_yaml(cfg), end="")
        return 0
    from sqltune.infer.serve import serve

    serve(cfg)
    return 0


def samples_command(argv: list[str]) -> int:
    from sqltune.config import SamplesConfig

    positional, options = parse_flags(argv)
    if options.pop("help", None) or "-h" in positional:
        print(USAGE["samples"] + "\n\noptions:")
        print("\n".join(help_lines(SamplesConfig)))
        return 0
    if len(positional) > 1:
        raise SqltuneError(f"expected at most one config file, got {' '.join(positional)}")
    show = _flag(options, "print_config")
    cfg = load(SamplesConfig, positional[0] if positional else None, options)
    if show:
        print(to_yaml(cfg), end="")
        return 0
    from sqltune.samples import samples
    from sqltune.trace import command_span

    with command_span("samples", cfg) as span:
        figures = samples(cfg)
        span.update(figures)
    print_figures("samples", figures)
    return 0


def export_command(argv: list[str]) -> int:
    from sqltune.config.settings import ExportConfig

    positional, options = parse_flags(argv)
    if options.pop("help", None) or "-h" in positional:
        print(USAGE["export"] + "\n\noptions:")
        print("\n".join(help_lines(ExportConfig)))
        return 0
    if positional:
        raise SqltuneError(f"export takes no positional argument: {' '.join(positional)!r} (options are --option "
                           "value)")
    if _flag(options, "fetch_converter"):
        _no_other_options("export --fetch_converter", options, [])
        from sqltune.infer.converter import converter

        print(converter())
        return 0
    show = _flag(options, "print_config")
    cfg = load(ExportConfig, None, options)
    if show:
        print(to_yaml(cfg), end="")
        return 0
    from sqltune.infer.export import export
    from sqltune.trace import command_span

    with command_span("export", cfg) as span:
        figures = export(cfg)
        span.update(figures)
    print_figures("export", figures)
    return 0


COMMANDS = {"run": run_command, "trace": trace_command, "models": models_command, "demo-data": demo_data_command,
            "ask": ask_command, "serve": serve_command, "export": export_command, "samples": samples_command}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`), raised where the program is so that it ends like Ctrl-C: trace spans
    say interrupted, partial outputs are cleaned up, the exit code is 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


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
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if command in STAGES:
            return run_stage(command, rest)
        if command in COMMANDS:
            return COMMANDS[command](rest)
        raise SqltuneError(f"unknown command {command!r}; `sqltune --help` lists the commands")
    except SqltuneError as exc:
        print(f"sqltune {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"sqltune {command}: {how} after {time.time() - started:.0f} s", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `sqltune trace show RUN --json | head`: the reader has gone; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except Exception as exc:  # an unexpected failure: one line unless debugging
        if os.environ.get("SQLTUNE_DEBUG"):
            raise
        print(f"sqltune {command}: internal error: {type(exc).__name__}: {exc} (SQLTUNE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
