"""A recipe of named steps (`steps:`), for runs that need several steps of one stage: SFT, sample the train split,
fine-tune on the right samples, DPO, predict greedy and with a vote, evaluate each (issue 28's recipes).

    name: rft
    model_name_or_path: ...            # run-level keys fill any step's field of the same name, as in `stages:`
    steps:
      - {name: prepare, stage: prepare, settings: {source: demo, name: demo}}
      - {name: sft, stage: train, settings: {max_steps: 20}}                 # reads <prepare name>_train
      - {name: sample, stage: predict, from: sft, settings: {dataset: demo_train, num_samples: 8, vote: execution}}
      - {name: right, stage: samples, from: sample}                          # registers dataset `right`
      - {name: dpo, stage: train, from: sft, data: right, settings: {stage: dpo}}
      - {name: greedy, stage: predict, from: dpo}                            # reads <prepare name>_dev
      - {name: eval_greedy, stage: evaluate, from: greedy}

`from` names the earlier step whose output a step reads: predict reads a train step's adapter (on that step's model)
or a merge step's model (none: the base model); merge reads a train step's adapter; a train step goes on training a
train step's adapter (`--adapter`: SFT, DPO, GRPO) or starts from a merge step's model; samples reads a predict step's
candidates; evaluate scores a predict step's output against its dataset's gold. `data` (train only) names a samples
step: its records (SFT) or preference pairs (DPO) are the training set. Every step writes into the run folder:
data/ (prepare, samples), <step>/ (train, merge), predictions/<step>.sql, eval/<step>/ (one arm of the page each).

Each step is one trace span and one identity (its settings, the content of what it reads from outside the run, the
identities of the steps it reads), as the stages of `stages:` are; `--STEP.OPTION VALUE` sets one step's option.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from sqltune.config import RUN_KEYS, field_name, recipe_values, shown
from sqltune.errors import SqltuneError
from sqltune.pipeline.core import registered_content, run_step
from sqltune.stages import STEP_STAGES

STEP_KEYS = {"name", "stage", "from", "data", "settings"}
STEP_NAME = re.compile(r"[A-Za-z0-9_-]+")  # no dot: --STEP.OPTION splits at the first one
RESERVED = {"run", "name", "run_dir", "steps"}  # span and config.yaml keys a step's name must not take
# what `from` may name, per stage (the stage of the step named)
SOURCES = {"train": ("train", "merge"), "merge": ("train",), "predict": ("train", "merge"), "samples": ("predict",),
           "evaluate": ("predict",), "prepare": ()}
NEEDS_FROM = {"merge", "samples", "evaluate"}


@dataclasses.dataclass
class Step:
    name: str
    stage: str
    source: str  # `from`: the step whose output this one reads ("" none)
    data: str  # a samples step whose dataset a train step learns from ("" none)
    settings: dict


@dataclasses.dataclass
class StepPlan:
    name: str
    steps: list[Step]
    shared: dict
    runs_dir: str | None = None
    compare_base: bool = False  # `stages:` only; a steps recipe predicts with the base model as a step of its own


def read_steps(path: str, data: dict, overrides: dict, name: str) -> StepPlan:
    """The checked plan: every step's stage known, its settings the stage's fields, its references earlier steps of
    the right stage. Any fault is one line naming the step."""
    raw = data.get("steps")
    if not isinstance(raw, list) or not raw:
        raise SqltuneError(f"{path}: `steps` must be a list of steps ({{name, stage, from, data, settings}}), "
                           f"not {shown(raw)}")
    stray = [k for k in data if k in ("stages", "compare_base") or k in STEP_STAGES]
    if stray:
        raise SqltuneError(f"{path}: `{stray[0]}` is for a `stages:` recipe; with `steps:` give each step's settings "
                           "in the step")
    steps: list[Step] = []
    for i, item in enumerate(raw, 1):
        where = f"{path}: step {i}"
        if not isinstance(item, dict):
            raise SqltuneError(f"{where} must be a mapping ({{name, stage, from, data, settings}}), not {shown(item)}")
        unknown = [k for k in item if k not in STEP_KEYS]
        if unknown:
            raise SqltuneError(f"{where}: unknown key {shown(unknown[0])} (a step has {', '.join(sorted(STEP_KEYS))}; "
                               "the stage's options go under `settings`)")
        label = str(item.get("name", ""))
        if not STEP_NAME.fullmatch(label) or label in RESERVED or isinstance(item.get("name"), (dict, list)):
            raise SqltuneError(f"{where}: `name` must be a plain name (letters, digits, _, -) other than "
                               f"{', '.join(sorted(RESERVED))}, not {shown(item.get('name'))}")
        where = f"{path}: step {label!r}"
        if any(s.name == label for s in steps):
            raise SqltuneError(f"{where} is named twice: step names must be unique")
        stage = item.get("stage")
        if stage not in STEP_STAGES:
            raise SqltuneError(f"{where}: unknown stage {shown(stage)} (stages: {', '.join(STEP_STAGES)})")
        settings = item.get("settings") or {}
        if not isinstance(settings, dict):
            raise SqltuneError(f"{where}: `settings` must be a mapping of option names to values, not "
                               f"{type(settings).__name__}")
        step = Step(label, stage, str(item.get("from") or ""), str(item.get("data") or ""), dict(settings))
        _check_refs(step, steps, where)
        steps.append(step)
    if [s.stage for s in steps].count("prepare") != 1 or steps[0].stage != "prepare":
        raise SqltuneError(f"{path}: the first step must be the one `prepare` step (every step reads its data folder)")
    for key, value in overrides.items():  # --STEP.OPTION sets one step's option; a plain key is run-level
        section, dot, option = key.partition(".")
        if dot:
            step = next((s for s in steps if s.name == section), None)
            if step is None:
                raise SqltuneError(f"unknown step {shown(section)} in --{key} (steps: "
                                   f"{', '.join(s.name for s in steps)})")
            step.settings[option] = value
        else:
            data = {**data, key: value}
            for s in steps:
                if key in s.settings:
                    s.settings[key] = value
    for s in steps:
        for key in s.settings:
            field_name(STEP_STAGES[s.stage].config, key, where=f"step {s.name!r} ({s.stage}) of {path}")
    shared = {k: v for k, v in data.items() if k not in RUN_KEYS and k != "steps"}
    known = {f.name for st in STEP_STAGES.values() for f in dataclasses.fields(st.config)}
    for key in shared:
        if key not in known:
            raise SqltuneError(f"{path}: unknown run-level key {shown(key)}")
    root = data.get("runs_dir")
    return StepPlan(name, steps, shared, str(root) if root else None)


def _check_refs(step: Step, earlier: list[Step], where: str) -> None:
    stages = {s.name: s.stage for s in earlier}
    if step.source:
        if step.source not in stages:
            raise SqltuneError(f"{where}: `from: {step.source}` names no earlier step (earlier: "
                               f"{', '.join(stages) or 'none'})")
        if stages[step.source] not in SOURCES[step.stage]:
            allowed = " or ".join(SOURCES[step.stage]) or "no step"
            raise SqltuneError(f"{where}: a {step.stage} step reads from a {allowed} step, not {step.source!r} "
                               f"({stages[step.source]})")
    elif step.stage in NEEDS_FROM:
        raise SqltuneError(f"{where}: a {step.stage} step needs `from:` naming the "
                           f"{' or '.join(SOURCES[step.stage])} step it reads")
    if step.data:
        if step.stage != "train":
            raise SqltuneError(f"{where}: `data` (a samples step to learn from) is for train steps")
        if stages.get(step.data) != "samples":
            raise SqltuneError(f"{where}: `data: {step.data}` names no earlier samples step")


def _values(plan: StepPlan, step: Step) -> dict:
    return recipe_values({**plan.shared, step.stage: step.settings}, step.stage, STEP_STAGES[step.stage].config)


def step_configs(plan: StepPlan, run: Path, dry: bool = False) -> list[tuple[Step, object, list[str]]]:
    """(step, its config with the run's paths filled in, the steps it reads) for every step, in order."""
    from sqltune.config import build
    from sqltune.data.registry import lookup

    data_dir = run / "data"
    prep = _values(plan, plan.steps[0])
    prefix = prep.get("name") or prep.get("source") or "spider"
    by_name = {s.name: s for s in plan.steps}
    cfgs: dict[str, object] = {}
    out = []
    for step in plan.steps:
        own = _values(plan, step)
        src = by_name.get(step.source)
        filled: dict = {}
        if step.stage == "prepare":
            filled = {"out": str(data_dir)}
        elif step.stage == "train":
            dataset = _values(plan, by_name[step.data]).get("name") or step.data if step.data else f"{prefix}_train"
            filled = {"dataset": own.get("dataset", dataset), "dataset_dir": str(data_dir),
                      "output_dir": str(run / step.name), "overwrite_output_dir": True}
            if src is not None and src.stage == "train":
                filled.update(adapter=str(run / src.name), model_name_or_path=cfgs[src.name].model_name_or_path)
            elif src is not None:
                filled["model_name_or_path"] = str(run / src.name)
        elif step.stage == "merge":
            filled = {"model_name_or_path": cfgs[src.name].model_name_or_path, "adapter": str(run / src.name),
                      "out": str(run / step.name), "overwrite_output_dir": True}
        elif step.stage == "predict":
            filled = {"dataset": own.get("dataset", f"{prefix}_dev"), "dataset_dir": str(data_dir),
                      "out": str(run / "predictions" / f"{step.name}.sql")}
            if src is not None and src.stage == "train":
                filled.update(model_name_or_path=cfgs[src.name].model_name_or_path, adapter=str(run / src.name))
            elif src is not None:
                filled.update(model_name_or_path=str(run / src.name), adapter="")
        elif step.stage == "samples":
            filled = {"samples": str(run / "predictions" / f"{src.name}.sql.raw.jsonl"),
                      "dataset": cfgs[src.name].dataset, "dataset_dir": str(data_dir), "name": own.get("name") or step.name}
        elif step.stage == "evaluate":
            dataset = cfgs[src.name].dataset
            try:
                entry = lookup(data_dir, dataset)
            except SqltuneError:
                if not dry:
                    raise
                entry = {k: f"<{dataset} {k}, from prepare>" for k in ("gold", "db_dir", "tables", "file_name")}
            bird = entry.get("source") == "bird"
            filled = {"pred": str(run / "predictions" / f"{src.name}.sql"), "gold": entry["gold"],
                      "db_dir": own.get("db_dir", entry["db_dir"]), "tables": own.get("tables", entry["tables"]),
                      "questions": entry["file_name"], "report": str(run / "eval" / step.name), "table": False,
                      "max_samples": own.get("max_samples", cfgs[src.name].max_samples)}
            filled.update({k: v for k, v in {"bird": bird, "difficulty": (entry.get("difficulty") or "") if bird
                                             else ""}.items() if k not in own})
        cfgs[step.name] = build(STEP_STAGES[step.stage].config, {**own, **filled},
                                where=f"step {step.name!r} ({step.stage})")
        reads = [plan.steps[0].name] if step.stage != "prepare" else []
        reads += [r for r in (step.source, step.data) if r and r not in reads]
        out.append((step, cfgs[step.name], reads))
    return out


def execute_steps(plan: StepPlan, run: Path, force: bool, dry: bool = False) -> tuple[dict, dict]:
    """Every step in order, each skipped when its identity is unchanged; returns (figures, resolved configs).
    The configs of later steps depend on files earlier ones write (the gold of a dataset), so each step's config is
    built once the steps before it ran."""
    from sqltune.io import atomic_write
    from sqltune.train.folders import resumable

    results: dict = {}
    ids: dict = {}
    digests: dict = {}
    configs: dict = {}
    if not dry:
        run.mkdir(parents=True, exist_ok=True)
    for i in range(len(plan.steps)):
        step, cfg, reads = step_configs(StepPlan(plan.name, plan.steps[:i + 1], plan.shared), run, dry)[-1]
        configs[step.name] = (step, cfg)
        if dry:
            continue
        continuing = None
        if step.stage == "train" and resumable(Path(cfg.output_dir)):
            continuing = {"resume": True, "overwrite_output_dir": False}
        fresh = {"overwrite": True} if step.stage == "predict" else None
        extra = registered_content(cfg) if step.stage == "train" else []
        results[step.name], ids[step.name] = run_step(run, step.name, cfg, [ids[r] for r in reads] + extra, force,
                                                      continuing, fresh, digests, stage=step.stage)
    if not dry:
        with atomic_write(run / "config.yaml") as handle:
            handle.write(steps_yaml(plan, run, configs))
    return results, configs


def steps_yaml(plan: StepPlan, run: Path, configs: dict) -> str:
    """config.yaml of a steps run: the steps (name, stage, references) and each step's resolved config by name."""
    listed = [{"name": s.name, "stage": s.stage, "from": s.source, "data": s.data} for s, _ in configs.values()]
    resolved = {s.name: dataclasses.asdict(cfg) for s, cfg in configs.values()}
    return yaml.safe_dump({"name": plan.name, "run_dir": str(run), "steps": listed, **resolved}, sort_keys=False)


def arms(plan: StepPlan, results: dict) -> dict:
    """Each evaluate step's figures by its name (an arm of the page and of the EX table)."""
    return {s.name: results[s.name] for s in plan.steps if s.stage == "evaluate" and s.name in results}
