"""`sqltune run`'s frame around the stages or steps (sqltune.pipeline's execute): the run folder and its lock, the
trace's run span, the EX table printed at the end and the run's page (report.html), also after a failed run."""

from __future__ import annotations

from pathlib import Path

from sqltune.config import load_yaml
from sqltune.io import environ_set
from sqltune.lock import held
from sqltune.pipeline.core import RUN_LOCK, RunPlan, execute_stages, pick_run_dir, plan_name, read_stages, \
    resolved_yaml
from sqltune.pipeline.steps import StepPlan, arms, execute_steps, read_steps, steps_yaml
from sqltune.trace import ENV_TRACE, TRACE_FILE, runs_dir, span


def read_plan(path: str, overrides: dict | None = None) -> RunPlan | StepPlan:
    """The recipe's RunPlan (`stages:`), or its StepPlan when it lists `steps:` (sqltune/pipeline/steps.py)."""
    data = load_yaml(path)
    if "steps" in data:
        return read_steps(path, data, overrides or {}, plan_name(path, data))
    return read_stages(path, data, overrides or {})


def execute(plan: RunPlan | StepPlan, run: Path, force: bool, dry: bool = False) -> tuple[dict, dict]:
    """Every planned stage or step in order; returns (figures, resolved configs). `dry` only resolves the configs."""
    if isinstance(plan, StepPlan):
        return execute_steps(plan, run, force, dry)
    return execute_stages(plan, run, force, dry)


def evaluated(plan, results: dict) -> dict:
    """Each arm's evaluation figures by the arm's name: `evaluate_<arm>` of `stages:`, an evaluate step's name."""
    if isinstance(plan, StepPlan):
        return arms(plan, results)
    return {k.split("_", 1)[1]: v for k, v in results.items() if k.startswith("evaluate_")}


def summary_table(arms: dict) -> str:
    rows = list(arms.items())
    if not rows:
        return ""
    width = max(12, *(len(label) for label, _ in rows))  # an evaluate step's name can be longer than `finetuned`
    lines = [f"{'model':<{width}} {'count':>6} {'EX':>7} {'EM':>7}"]
    for label, fig in rows:
        ex = "-" if fig.get("ex") is None else f"{fig['ex']:.3f}"
        em = "-" if fig.get("em") is None else f"{fig['em']:.3f}"
        lines.append(f"{label:<{width}} {fig.get('count', 0):>6} {ex:>7} {em:>7}")
    return "\n".join(lines)


def run_recipe(path: str, force: bool = False, new: bool = False, run_dir: str | None = None,
               root: str | None = None, overrides: dict | None = None, print_config: bool = False) -> dict:
    """Run (or continue) the recipe at `path`; prints progress and the EX table, returns each stage's figures.
    With `print_config`, print every stage's resolved config as YAML and change nothing."""
    plan = read_plan(path, overrides)
    root_dir = Path(root or plan.runs_dir or runs_dir())
    run = pick_run_dir(plan, root_dir, run_dir, new)
    if print_config:
        _, configs = execute(plan, run, force, dry=True)
        print((resolved_yaml if isinstance(plan, RunPlan) else steps_yaml)(plan, run, configs), end="")
        return {}
    print(f"run folder: {run}")
    run.mkdir(parents=True, exist_ok=True)
    with held(run / RUN_LOCK, f"another sqltune run is working in {run}",
              "wait for it to finish, or start a separate run with --new"):
        try:
            with environ_set({ENV_TRACE: str(run / TRACE_FILE)}), span(run / TRACE_FILE, run.name, "run") as figures:
                results, _ = execute(plan, run, force)
                for arm, fig in evaluated(plan, results).items():
                    if fig.get("ex") is not None:
                        figures[f"ex_{arm}"] = fig["ex"]
        except Exception:
            write_page(run)  # a failed run's page shows the stage that failed and its error
            raise
        page = write_page(run)
    table = summary_table(evaluated(plan, results))
    if table:
        print("\nexecution accuracy on the dev split (evaluation reports in " f"{run / 'eval'}):\n" + table)
    print(f"\ntrace: sqltune trace show {run.name} --runs_dir {run.parent}")
    if page:
        print(f"report: {page}")
    return results


def write_page(run: Path) -> Path | None:
    """The run's page, report.html (sqltune/report/); a page that cannot be written is a warning, never a failed
    run."""
    from sqltune.report.render import write_run_page

    return write_run_page(run)
