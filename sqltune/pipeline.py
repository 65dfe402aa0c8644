"""`sqltune run`: prepare -> train -> merge -> predict -> evaluate from one YAML file, in one run folder.

The YAML has one section per stage (the same fields as the stage's own command) and a few run-level keys:

    name: demo                      # run folders are runs/<name>-<timestamp>/
    stages: [prepare, train, merge, predict, evaluate]    # any subset, in this order
    compare_base: true              # also predict and evaluate with the base model, and print both EX
    model_name_or_path: ...         # run-level keys fill any stage field of the same name
    prepare: {...}  train: {...}  merge: {...}  predict: {...}  evaluate: {...}

Paths between stages are filled in by the run (prepared data, adapter, merged model, predictions, reports all
live in the run folder). A stage whose outputs exist for the same settings is skipped (`--force` reruns it), so
`sqltune run` on the same file continues the latest unfinished run where it stopped (`--new` starts afresh,
`--run_dir DIR` picks a folder). Every stage writes a trace span (see `sqltune trace`).

    sqltune run RECIPE.yaml [--force] [--new] [--run_dir DIR] [--runs_dir DIR]
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import yaml

from sqltune.config import RUN_KEYS, build, load_yaml, recipe_values
from sqltune.errors import SqltuneError
from sqltune.io import write_json
from sqltune.stages import ORDER, STAGES
from sqltune.trace import ENV_TRACE, TRACE_FILE, append_span, read_trace, runs_dir, span


@dataclasses.dataclass
class RunPlan:
    name: str
    stages: list[str]
    compare_base: bool
    sections: dict[str, dict]
    shared: dict


def read_plan(path: str) -> RunPlan:
    data = load_yaml(path)
    name = str(data.get("name") or Path(path).stem)
    stages = data.get("stages") or list(ORDER)
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",")]
    unknown = [s for s in stages if s not in ORDER]
    if unknown:
        raise SqltuneError(f"{path}: unknown stage {unknown[0]!r} in `stages` (known: {', '.join(ORDER)})")
    for s in ORDER:
        recipe_values(data, s, STAGES[s].config, where=path)  # a section that is not a mapping: one line
    sections = {s: dict(data.get(s) or {}) for s in ORDER}
    shared = {k: v for k, v in data.items() if k not in RUN_KEYS and k not in ORDER}
    for key in shared:
        if not any(key in {f.name for f in dataclasses.fields(st.config)} for st in STAGES.values()):
            raise SqltuneError(f"{path}: unknown run-level key {key!r}")
    return RunPlan(name, [s for s in ORDER if s in stages], bool(data.get("compare_base", False)), sections, shared)


def pick_run_dir(plan: RunPlan, root: Path, run_dir: str | None, new: bool) -> Path:
    if run_dir:
        return Path(run_dir)
    if not new and root.is_dir():
        mine = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith(plan.name + "-"))
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
_EXECUTION_ONLY = {"resume", "overwrite_output_dir", "overwrite", "quiet"}


def _fingerprint(cfg) -> str:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _EXECUTION_ONLY}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_step(run: Path, label: str, func, cfg, force: bool) -> dict:
    """Run one stage unless its marker says it already finished with the same settings."""
    marker = run / ".done" / f"{label}.json"
    fingerprint = _fingerprint(cfg)
    if not force and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("fingerprint") == fingerprint:
            print(f"[{label}] done already with these settings: skipped (--force reruns it)")
            append_span(run / TRACE_FILE, {"run_id": run.name, "stage": label, "start": None, "end": None,
                                           "duration_s": 0.0, "status": "skipped", "figures": done["figures"],
                                           "error": None})
            return done["figures"]
    print(f"[{label}] running")
    with span(run / TRACE_FILE, run.name, label) as figures:
        result = func(cfg) or {}
        figures.update({k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    write_json(marker, {"fingerprint": fingerprint, "figures": keep})
    return keep


def execute(plan: RunPlan, run: Path, force: bool) -> dict:
    run.mkdir(parents=True, exist_ok=True)
    data_dir = run / "data"
    results: dict = {}
    name = plan.sections["prepare"].get("name") or plan.sections["prepare"].get("source") or "spider"
    train_set = f"{name}_train"
    dev_set = plan.sections["predict"].get("dataset", f"{name}_dev")  # what predict answers and evaluate scores

    prep = stage_config(plan, "prepare", run, out=str(data_dir))
    train_cfg = stage_config(plan, "train", run, dataset=plan.sections["train"].get("dataset", train_set),
                             dataset_dir=str(data_dir), output_dir=str(run / "adapter"),
                             overwrite_output_dir=True) if "train" in plan.stages else None
    configs = {"prepare": prep, "train": train_cfg}
    if "prepare" in plan.stages:
        results["prepare"] = run_step(run, "prepare", STAGES["prepare"].run, prep, force)
    if train_cfg is not None:
        resume = (run / "adapter").is_dir() and any((run / "adapter").glob("checkpoint-*")) and not force and \
            not (run / ".done" / "train.json").is_file()
        if resume:
            train_cfg = dataclasses.replace(train_cfg, resume=True, overwrite_output_dir=False)
        results["train"] = run_step(run, "train", STAGES["train"].run, train_cfg, force)
    base_model = plan.shared.get("model_name_or_path") or plan.sections["train"].get("model_name_or_path") or \
        plan.sections["predict"].get("model_name_or_path", "")
    tuned_model, tuned_adapter = base_model, ""
    if "merge" in plan.stages:
        merge_cfg = stage_config(plan, "merge", run, model_name_or_path=base_model, adapter=str(run / "adapter"),
                                 out=str(run / "merged"), overwrite_output_dir=True)
        configs["merge"] = merge_cfg
        results["merge"] = run_step(run, "merge", STAGES["merge"].run, merge_cfg, force)
        tuned_model = str(run / "merged")
    elif "train" in plan.stages:
        tuned_adapter = str(run / "adapter")
    variants = [("finetuned", tuned_model, tuned_adapter)] if {"train", "merge"} & set(plan.stages) else \
        [("base", base_model, "")]
    if plan.compare_base and variants[0][0] == "finetuned":
        variants.insert(0, ("base", base_model, ""))
    from sqltune.data.registry import lookup

    for label, model, adapter in variants:
        pred_file = run / "predictions" / f"{label}.sql"
        if "predict" in plan.stages:
            cfg = stage_config(plan, "predict", run, model_name_or_path=model, adapter=adapter,
                               dataset=dev_set, dataset_dir=str(data_dir),
                               out=str(pred_file))
            configs[f"predict_{label}"] = cfg
            results[f"predict_{label}"] = run_step(run, f"predict_{label}", STAGES["predict"].run,
                                                   cfg, force)
        if "evaluate" in plan.stages:
            entry = lookup(data_dir, dev_set)
            cfg = stage_config(plan, "evaluate", run, pred=str(pred_file), gold=entry["gold"],
                               db_dir=plan.sections["evaluate"].get("db_dir", entry["db_dir"]),
                               tables=plan.sections["evaluate"].get("tables", entry["tables"]),
                               questions=entry["file_name"], report=str(run / "eval" / label), quiet=True)
            configs[f"evaluate_{label}"] = cfg
            results[f"evaluate_{label}"] = run_step(run, f"evaluate_{label}",
                                                    STAGES["evaluate"].run, cfg, force)
    resolved = {k: dataclasses.asdict(v) for k, v in configs.items() if v is not None}
    (run / "config.yaml").write_text(yaml.safe_dump({"name": plan.name, "stages": plan.stages,
                                                     "compare_base": plan.compare_base, **resolved}, sort_keys=False))
    return results


def summary_table(results: dict) -> str:
    rows = [(k.split("_", 1)[1], v) for k, v in results.items() if k.startswith("evaluate_")]
    if not rows:
        return ""
    lines = [f"{'model':<12} {'count':>6} {'EX':>7} {'EM':>7}"]
    for label, fig in rows:
        ex = "-" if fig.get("ex") is None else f"{fig['ex']:.3f}"
        em = "-" if fig.get("em") is None else f"{fig['em']:.3f}"
        lines.append(f"{label:<12} {fig.get('count', 0):>6} {ex:>7} {em:>7}")
    return "\n".join(lines)


def run_recipe(path: str, force: bool = False, new: bool = False, run_dir: str | None = None,
               root: str | None = None) -> dict:
    """Run (or continue) the recipe at `path`; prints progress and the EX table, returns each stage's figures."""
    plan = read_plan(path)
    root_dir = Path(root or runs_dir())
    run = pick_run_dir(plan, root_dir, run_dir, new)
    print(f"run folder: {run}")
    os.environ[ENV_TRACE] = str(run / TRACE_FILE)
    try:
        with span(run / TRACE_FILE, run.name, "run") as figures:
            results = execute(plan, run, force)
            for key, fig in results.items():
                if key.startswith("evaluate_") and fig.get("ex") is not None:
                    figures[f"ex_{key.split('_', 1)[1]}"] = fig["ex"]
    finally:
        os.environ.pop(ENV_TRACE, None)
    table = summary_table(results)
    if table:
        print("\nexecution accuracy on the dev split (evaluation reports in " f"{run / 'eval'}):\n" + table)
    print(f"\ntrace: sqltune trace show {run.name} --runs_dir {root_dir}")
    return results
