"""`train --stage sft|dpo|grpo` (issue 28 item 2): the setting, its one-line errors and the dispatch to each stage's
module; sft stays the default and the code path it was."""

from __future__ import annotations

import pytest

import sqltune.train.dispatch as dispatch
from sqltune.cli import main
from sqltune.config import TrainConfig
from sqltune.errors import SqltuneError


def test_sft_is_the_default_stage():
    assert TrainConfig().stage == "sft"
    assert {TrainConfig(stage=s, per_device_train_batch_size=8).stage  # grpo: a multiple of its group size
            for s in ("sft", "dpo", "grpo")} == {"sft", "dpo", "grpo"}


def test_an_unknown_stage_is_one_line(capsys):
    assert main(["train", "--stage", "ppo", "--model_name_or_path", "x", "--dataset", "d"]) == 2
    err = capsys.readouterr().err
    assert "--stage must be one of sft, dpo, grpo, not 'ppo'" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_sft_dispatches_to_the_sft_module(monkeypatch):
    import sqltune.train.sft as sft

    seen = []
    monkeypatch.setattr(sft, "train", lambda cfg: seen.append(cfg.stage) or {"ran": "sft"})
    assert dispatch.train(TrainConfig(model_name_or_path="m", dataset="d")) == {"ran": "sft"}
    assert seen == ["sft"]


def test_a_stage_whose_module_is_absent_is_one_line(monkeypatch, capsys):
    """A stage whose module this install lacks (here grpo pointed at a name that does not exist) is one line from the
    command, not an ImportError traceback."""
    monkeypatch.setitem(dispatch.RUNNERS, "grpo", ("sqltune.train.no_such_stage", "train_grpo"))
    with pytest.raises(SqltuneError, match="--stage grpo is not available in this install"):
        dispatch.runner("grpo")
    assert main(["train", "--stage", "grpo", "--model_name_or_path", "x", "--dataset", "d",
                 "--per_device_train_batch_size", "8"]) == 2
    err = capsys.readouterr().err
    assert "--stage grpo is not available" in err and err.count("\n") == 1, err


def test_grpo_dispatches_to_train_grpo(monkeypatch):
    """`--stage grpo` calls sqltune.train.grpo.train_grpo(cfg) (a stand-in module here)."""
    import sys
    import types

    module = types.ModuleType("sqltune_test_grpo")
    module.__spec__ = types.SimpleNamespace(name="sqltune_test_grpo")
    module.train_grpo = lambda cfg: {"ran": cfg.stage}
    monkeypatch.setitem(sys.modules, "sqltune_test_grpo", module)
    monkeypatch.setitem(dispatch.RUNNERS, "grpo", ("sqltune_test_grpo", "train_grpo"))
    cfg = TrainConfig(stage="grpo", model_name_or_path="m", dataset="d", per_device_train_batch_size=8)
    assert dispatch.train(cfg) == {"ran": "grpo"}
