"""`train --stage sft|dpo|grpo`: which training module runs a TrainConfig.

One table from stage to (module, function). `sft` is sqltune/train/sft.py, the code path it always was; `dpo` and
`grpo` live in modules of their own (sqltune/train/dpo.py, sqltune/train/grpo.py), imported only when asked for, so
a stage whose module is absent from this install is one line, not an ImportError traceback. An ImportError raised
*inside* a present module (a missing dependency, say) is not hidden: only the module's own absence is reported here.
"""

from __future__ import annotations

import importlib
import importlib.util

from sqltune.config import TrainConfig
from sqltune.errors import SqltuneError

RUNNERS = {"sft": ("sqltune.train.sft", "train"),
           "dpo": ("sqltune.train.dpo", "train_dpo"),
           "grpo": ("sqltune.train.grpo", "train_grpo")}


def runner(stage: str):
    """The function that trains `stage`; one line when its module is not part of this install."""
    if stage not in RUNNERS:
        raise SqltuneError(f"--stage must be one of {', '.join(RUNNERS)}, not {stage!r}")
    module_name, function = RUNNERS[stage]
    if importlib.util.find_spec(module_name) is None:
        raise SqltuneError(f"--stage {stage} is not available in this install ({module_name} is missing)")
    return getattr(importlib.import_module(module_name), function)


def train(cfg: TrainConfig) -> dict:
    """Run the training stage `cfg.stage` names and return its figures."""
    return runner(cfg.stage)(cfg)
