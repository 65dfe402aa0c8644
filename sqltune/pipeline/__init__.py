"""`sqltune run`: prepare -> train -> merge -> predict -> evaluate from one YAML file, in one run folder.

The YAML has one section per stage (the same fields as the stage's own command) and a few run-level keys:

    name: demo                      # run folders are runs/<name>-<YYYYmmdd-HHMMSS>/
    stages: [prepare, train, merge, predict, evaluate]    # any subset, in this order
    compare_base: true              # also predict and evaluate with the base model, and print both EX
    model_name_or_path: ...         # run-level keys fill any stage field of the same name
    prepare: {...}  train: {...}  merge: {...}  predict: {...}  evaluate: {...}

Paths between stages are filled in by the run (prepared data, adapter, merged model, predictions, reports all
live in the run folder). A stage's identity is its own settings (paths resolved, execution-only switches such as
resume/overwrite left out), the content of what it reads from outside the run folder (source data, base model
folder, databases: files by content, those over 64 MB by size and modification time), plus the identities of
everything it reads from earlier stages: prepared data -> adapter -> merged model -> predictions -> evaluation.
A stage whose identity is unchanged is skipped; any change reruns it and everything
downstream (`--force` reruns all). So `sqltune run` on the same file continues the latest unfinished run of that
recipe where it stopped (`--new` starts afresh, `--run_dir DIR` picks a folder). Every stage writes a trace span
(see `sqltune trace`). One `sqltune run` works in a run folder at a time: it holds `<run>/.lock`, and a second one
stops with one line naming the holder. At the end (also of a failed run) it writes `<run>/report.html`, the run's
page (sqltune/report/: stages, time and memory, training curves, EX/EM per level for every arm, failure kinds,
links to the files); a page that cannot be written is a warning, not a failed run.

    sqltune run RECIPE.yaml [--force] [--new] [--run_dir DIR] [--runs_dir DIR] [--print_config]
                            [--SECTION.OPTION VALUE ...] [--OPTION VALUE ...]

A recipe may instead list named steps, several of one stage (SFT, sampling the train split, `samples`, DPO, greedy
and vote arms, an evaluation each), each reading an earlier step's output by name (sqltune/pipeline/steps.py):

    steps:
      - {name: prepare, stage: prepare, settings: {source: demo}}
      - {name: sft, stage: train, settings: {max_steps: 20}}
      - {name: greedy, stage: predict, from: sft}
      - {name: eval_greedy, stage: evaluate, from: greedy}

`--sft.max_steps 2` then sets one step's option. `--train.max_steps 2` sets one stage's option; `--model_name_or_path X` sets a run-level key, which wins over the
same key in every section. `--print_config` prints every stage's resolved config (YAML) and exits.
"""

from sqltune.pipeline.core import RunPlan, identity, outside_content, registered_content, run_step, stage_config
from sqltune.pipeline.run import evaluated, execute, read_plan, run_recipe, summary_table, write_page
from sqltune.pipeline.steps import StepPlan

__all__ = ["RunPlan", "StepPlan", "evaluated", "execute", "identity", "outside_content", "read_plan",
           "registered_content", "run_recipe", "run_step", "stage_config", "summary_table", "write_page"]
