"""The `stages:` recipe (one of each stage, in pipeline order) and what every recipe shares: run folders, a
step's identity (its settings, what it read, the content of outside inputs) and running a step unless done already.
The recipe format is described in sqltune/pipeline/__init__.py (`sqltune run --help`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import hashlib
import json
import os
import re
from pathlib import Path

import yaml

from sqltune.config import RUN_KEYS, build, field_name, recipe_values, shown
from sqltune.config.loading import _coerce
from sqltune.digest import tree_digest
from sqltune.errors import SqltuneError
from sqltune.io import atomic_write, write_json
from sqltune.stages import ORDER, STAGES, STEP_STAGES
from sqltune.trace import TRACE_FILE, append_span, read_trace, span

RUN_LOCK = ".lock"  # held by the one `sqltune run` working in a run folder (sqltune.lock)
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a run name never walks out of the runs folder


@dataclasses.dataclass
class RunPlan:
    name: str
    stages: list[str]
    compare_base: bool
    sections: dict[str, dict]
    shared: dict
    runs_dir: str | None = None


def apply_overrides(data: dict, overrides: dict) -> dict:
    """Command-line values on top of the recipe: `train.max_steps` sets one section's option; a plain key is
    run-level and replaces that key in every section that sets it too (the command line beats the file)."""
    data = dict(data)
    for key, value in overrides.items():
        section, dot, option = key.partition(".")
        if dot:
            if section not in ORDER:
                raise SqltuneError(f"unknown stage {shown(section)} in --{key} (stages: {', '.join(ORDER)})")
            own = data.get(section)
            own = {} if own is None else own
            if not isinstance(own, dict):
                raise SqltuneError(f"the `{section}` section must be a mapping of option names to values, "
                                   f"not {type(own).__name__}")
            data[section] = {**own, option: value}
        else:
            data[key] = value
            if key not in RUN_KEYS:
                for s in ORDER:
                    if isinstance(data.get(s), dict) and key in data[s]:
                        data[s] = {**data[s], key: value}
    return data


def _stages(value, path: str) -> list[str]:
    if value is None:
        return list(ORDER)
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise SqltuneError(f"{path}: `stages` must be a list of stage names ({', '.join(ORDER)}), not {shown(value)}")
    if not value:
        raise SqltuneError(f"{path}: `stages` must name at least one stage ({', '.join(ORDER)}); "
                           "leave it out to run them all")
    unknown = [s for s in value if s not in ORDER]
    if unknown:
        raise SqltuneError(f"{path}: unknown stage {shown(unknown[0])} in `stages` (known: {', '.join(ORDER)})")
    return [s for s in ORDER if s in value]


def plan_name(path: str, data: dict) -> str:
    """The recipe's `name` (default: its file's stem), a plain name so a run folder stays in the runs folder."""
    if data.get("name") is None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).stem).lstrip(".") or "run"
    else:
        name = str(data["name"])
        if isinstance(data["name"], (dict, list)) or not PLAIN_NAME.fullmatch(name):
            raise SqltuneError(f"{path}: `name` must be a plain name (letters, digits, _, -, and . not first), "
                               f"not {shown(data['name'])}")
    return name


def read_stages(path: str, data: dict, overrides: dict) -> RunPlan:
    """The plan of a `stages:` recipe (the recipe's values `data`, the command line's `overrides`)."""
    data = apply_overrides(data, overrides)
    name = plan_name(path, data)
    stages = _stages(data.get("stages"), path)
    compare_base = _coerce("compare_base", data.get("compare_base", False), bool)
    for s in ORDER:
        for key in recipe_values(data, s, STAGES[s].config, where=path):  # a section that is not a mapping: one line
            field_name(STAGES[s].config, key, where=f"the `{s}` section of {path}")
    sections = {s: dict(data.get(s) or {}) for s in ORDER}
    shared = {k: v for k, v in data.items() if k not in RUN_KEYS and k not in ORDER}
    known = {f.name for st in STAGES.values() for f in dataclasses.fields(st.config)}
    for key in shared:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known | RUN_KEYS | set(ORDER)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SqltuneError(f"{path}: unknown run-level key {shown(key)}{hint}")
    root = data.get("runs_dir")
    return RunPlan(name, stages, compare_base, sections, shared, str(root) if root else None)


def pick_run_dir(plan: RunPlan, root: Path, run_dir: str | None, new: bool) -> Path:
    """An absolute folder: the one asked for, the latest unfinished run of this very recipe name, or a new one."""
    if run_dir:
        return Path(run_dir).expanduser().resolve()
    root = root.expanduser().resolve()
    if not new and root.is_dir():
        pattern = re.compile(re.escape(plan.name) + r"-\d{8}-\d{6}")  # `p` never continues a run of `p-big`
        mine = sorted(d for d in root.iterdir() if d.is_dir() and pattern.fullmatch(d.name))
        if mine:
            spans = read_trace(mine[-1])
            finished = any(s["stage"] == "run" and s["status"] == "ok" for s in spans)
            if not finished:
                return mine[-1]  # continue the latest unfinished run
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{plan.name}-{stamp}"


def stage_config(plan: RunPlan, stage: str, run: Path, **filled):
    """The stage's config: run-level keys, then the YAML section, then the paths the run fills in."""
    cls = STAGES[stage].config
    values = recipe_values({**plan.shared, stage: plan.sections[stage]}, stage, cls)
    values.update(filled)
    return build(cls, values, where=f"the `{stage}` section")


# how a stage is carried out, not what it makes: a resumed stage is the same stage
_EXECUTION_ONLY = {"resume", "overwrite_output_dir", "overwrite", "quiet", "table", "workers"}
_PATHS = {"data_dir", "out", "dataset_dir", "output_dir", "deepspeed", "adapter", "pred", "gold", "db_dir", "tables",
          "report", "questions", "difficulty", "pairs", "dev_pairs"}
_MAYBE_PATHS = {"model_name_or_path", "tokenizer"}  # a folder, or a catalog / hub name
# Every other path a stage reads: when it lies outside the run folder, its identity holds what it contains.
_INPUTS = (_PATHS | _MAYBE_PATHS) - {"out", "output_dir", "report"}


def _settled(key: str, value):
    """A path as the one absolute spelling of its folder, so `runs/x` and `/abs/runs/x` are the same setting."""
    if isinstance(value, str) and value and (key in _PATHS or (key in _MAYBE_PATHS and
                                                               Path(value).expanduser().exists())):
        return os.path.realpath(os.path.expanduser(value))
    return value


def identity(cfg, reads: list[str] = (), run: Path | None = None, digests: dict | None = None) -> str:
    """A stage's own settings, the identities of what it reads from upstream stages, and the content of what it
    reads from outside the run folder (source data, a base model folder, databases), so that a file changed in
    place under the same path reruns the stage. Paths inside `run` are upstream outputs, covered by `reads`.
    `digests` keeps the content digests of one run, so stages reading the same folder read it once."""
    settings = {k: _settled(k, v) for k, v in dataclasses.asdict(cfg).items() if k not in _EXECUTION_ONLY}
    digests = {} if digests is None else digests
    contents = {k: outside_content(v, run, digests) for k, v in settings.items() if k in _INPUTS}
    blob = json.dumps({"settings": settings, "reads": list(reads),
                       "contents": {k: v for k, v in contents.items() if v}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def outside_content(value, run: Path | None, digests: dict) -> str | None:
    """The digest of an existing file or folder outside the run folder (None for anything else: a catalog or hub
    name, an unset option, an output of an earlier stage)."""
    if not isinstance(value, str) or not value or not os.path.isabs(value) or not os.path.exists(value):
        return None
    if run is not None and Path(value).is_relative_to(Path(os.path.realpath(run))):
        return None
    if value not in digests:
        digests[value] = tree_digest(Path(value))
    return digests[value]


def _marker(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def registered_content(cfg) -> list[str]:
    """What a `--stage dpo` training reads beyond prepare's output: the records and preference pairs `sqltune samples`
    registered in the run's data folder (prepare's identity does not cover them), by content, so that new samples
    rerun the training. Empty for other stages (their records are prepare's) and before anything is registered (the
    stage then fails with its own line)."""
    if getattr(cfg, "stage", "sft") != "dpo":
        return []
    from sqltune.data.registry import lookup_many
    from sqltune.digest import files_digest

    try:
        entries = lookup_many(cfg.dataset_dir, cfg.dataset)
    except SqltuneError:
        return []
    files = [Path(e[k]) for e in entries for k in ("file_name", "pairs") if e.get(k) and Path(e[k]).is_file()]
    return [f"dataset files {files_digest(files)}"]


def recorded_identity(run: Path, label: str) -> str:
    """The identity of what a stage left in the run folder when this run does not run it (`stages` subset)."""
    return _marker(run / ".done" / f"{label}.json").get("identity") or f"{label}:not-recorded"


def run_step(run: Path, label: str, cfg, reads: list[str], force: bool, continuing: dict | None = None,
             fresh: dict | None = None, digests: dict | None = None, stage: str = "") -> tuple[dict, str]:
    """Run one stage unless it finished already with the same identity; returns its figures and identity.

    An attempt of the same identity that did not finish is continued (`continuing` changes the config, e.g.
    resume=True); any other attempt starts afresh (`fresh`, e.g. overwrite=True: old outputs are of another run)."""
    done_path, started_path = run / ".done" / f"{label}.json", run / ".done" / f"{label}.started.json"
    ident = identity(cfg, reads, run, digests)
    done = _marker(done_path)
    if not force and done.get("identity") == ident:
        print(f"[{label}] done already with these settings and inputs: skipped (--force reruns it)")
        append_span(run / TRACE_FILE, {"run_id": run.name, "stage": label, "start": None, "end": None,
                                       "duration_s": 0.0, "status": "skipped", "figures": done.get("figures", {}),
                                       "error": None})
        return done.get("figures", {}), ident
    again = not force and _marker(started_path).get("identity") == ident
    cfg = dataclasses.replace(cfg, **((continuing if again else fresh) or {}))
    if done_path.exists():
        done_path.unlink()  # the outputs are about to change: the old marker no longer describes them
    write_json(started_path, {"identity": ident})
    print(f"[{label}] {'continuing' if again else 'running'}")
    with span(run / TRACE_FILE, run.name, label) as figures:
        key = stage or label.split("_")[0]
        result = (STAGES[key] if key in STAGES else STEP_STAGES[key]).run(cfg) or {}  # STAGES: tests stand in there
        figures.update({k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    give_memory_back()  # before the next step, whose vLLM engine or training needs the RAM this one freed
    write_json(done_path, {"identity": ident, "figures": keep})
    return keep, ident


def give_memory_back() -> None:
    """Hand the heap a finished step freed back to the system. Python and torch free into glibc's heap, which
    keeps the pages: after SFT of Qwen2.5-Coder-0.5B the `sqltune run` process went on holding some 20 GB it no
    longer used, and the next step's vLLM engine (its own process) found 2 GiB free and would not start.
    glibc's malloc_trim returns the free pages; where there is none (macOS, musl) only the collection runs."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def execute_stages(plan: RunPlan, run: Path, force: bool, dry: bool = False) -> tuple[dict, dict]:
    """Every planned stage in order; returns (figures, resolved configs). `dry` only resolves the configs."""
    from sqltune.data.registry import lookup

    data_dir = run / "data"
    results: dict = {}
    configs: dict = {}
    ids: dict = {}
    digests: dict = {}  # content of the inputs outside the run, read once per run

    def step(label: str, cfg, reads: list[str], continuing: dict | None = None, fresh: dict | None = None):
        configs[label] = cfg
        if not dry:
            results[label], ids[label] = run_step(run, label, cfg, reads, force, continuing, fresh, digests)

    def ident(label: str) -> str:
        return ids[label] if label in ids else recorded_identity(run, label)

    if not dry:
        run.mkdir(parents=True, exist_ok=True)
    name = plan.sections["prepare"].get("name") or plan.sections["prepare"].get("source") or "spider"
    dev_set = plan.sections["predict"].get("dataset", f"{name}_dev")  # what predict answers and evaluate scores

    if "prepare" in plan.stages:
        step("prepare", stage_config(plan, "prepare", run, out=str(data_dir)), [])
    if "train" in plan.stages:
        adapter = run / "adapter"
        cfg = stage_config(plan, "train", run, dataset=plan.sections["train"].get("dataset", f"{name}_train"),
                           dataset_dir=str(data_dir), output_dir=str(adapter), overwrite_output_dir=True)
        from sqltune.train.folders import resumable  # a complete checkpoint (a kill mid-save leaves an incomplete one)

        checkpoints = resumable(adapter)
        step("train", cfg, [ident("prepare"), *registered_content(cfg)],
             continuing={"resume": True, "overwrite_output_dir": False} if checkpoints else None)
    base_model = plan.shared.get("model_name_or_path") or plan.sections["train"].get("model_name_or_path") or \
        plan.sections["predict"].get("model_name_or_path", "")
    tuned_model, tuned_adapter, tuned_from = base_model, "", "train"
    if "merge" in plan.stages:
        step("merge", stage_config(plan, "merge", run, model_name_or_path=base_model, adapter=str(run / "adapter"),
                                   out=str(run / "merged"), overwrite_output_dir=True), [ident("train")])
        tuned_model, tuned_from = str(run / "merged"), "merge"
    else:
        tuned_adapter = str(run / "adapter")
    variants = [("finetuned", tuned_model, tuned_adapter)] if {"train", "merge"} & set(plan.stages) else \
        [("base", base_model, "")]
    if plan.compare_base and variants[0][0] == "finetuned":
        variants.insert(0, ("base", base_model, ""))

    for label, model, adapter in variants:
        pred_file = run / "predictions" / f"{label}.sql"
        model_reads = [ident("prepare")] + ([ident(tuned_from)] if label == "finetuned" else [])
        if "predict" in plan.stages:
            cfg = stage_config(plan, "predict", run, model_name_or_path=model, adapter=adapter,
                               dataset=dev_set, dataset_dir=str(data_dir), out=str(pred_file))
            step(f"predict_{label}", cfg, model_reads, fresh={"overwrite": True})
        if "evaluate" in plan.stages:
            try:
                entry = lookup(data_dir, dev_set)
            except SqltuneError:
                if not dry:
                    raise
                entry = {k: f"<{dev_set} {k}, from prepare>" for k in ("gold", "db_dir", "tables", "file_name",
                                                                       "difficulty")}
                entry["source"] = plan.sections["prepare"].get("source")
            cfg = stage_config(plan, "evaluate", run, pred=str(pred_file), gold=entry["gold"],
                               db_dir=plan.sections["evaluate"].get("db_dir", entry["db_dir"]),
                               tables=plan.sections["evaluate"].get("tables", entry["tables"]),
                               questions=entry["file_name"], report=str(run / "eval" / label), table=False,
                               max_samples=plan.sections["evaluate"].get("max_samples", predicted_prefix(plan)),
                               **scoring_of(plan, entry))
            step(f"evaluate_{label}", cfg, [ident("prepare"), ident(f"predict_{label}")])
    if not dry:
        with atomic_write(run / "config.yaml") as handle:
            handle.write(resolved_yaml(plan, run, configs))
    return results, configs


def scoring_of(plan: RunPlan, entry: dict) -> dict:
    """BIRD's rules (`bird`) and difficulty file for the dev set that prepare registered as BIRD, each unless the
    recipe sets it: scored with Spider's rules and no difficulties, a BIRD run's figures are not BIRD's."""
    bird = entry.get("source") == "bird"
    found = {"bird": bird, "difficulty": (entry.get("difficulty") or "") if bird else ""}
    own = recipe_values({**plan.shared, "evaluate": plan.sections["evaluate"]}, "evaluate", STAGES["evaluate"].config)
    return {k: v for k, v in found.items() if k not in own}


def predicted_prefix(plan: RunPlan) -> int:
    """How many dev records predict answers (its `max_samples`), so evaluate scores that same prefix."""
    values = recipe_values({**plan.shared, "predict": plan.sections["predict"]}, "predict", STAGES["predict"].config)
    return int(values.get("max_samples") or 0)


def resolved_yaml(plan: RunPlan, run: Path, configs: dict) -> str:
    resolved = {k: dataclasses.asdict(v) for k, v in configs.items()}
    return yaml.safe_dump({"name": plan.name, "run_dir": str(run), "stages": plan.stages,
                           "compare_base": plan.compare_base, **resolved}, sort_keys=False)

