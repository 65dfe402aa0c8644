"""train --max_train_minutes and --schedule_to_budget: a run the time budget stops says so, and with
--schedule_to_budget its learning-rate schedule ends with the budget, also over a resume. Time is a fake clock (one
minute per optimizer step): tests never time things."""

from __future__ import annotations

import json

import pytest
from conftest import Killed, training_killed_after_save
from test_train import config

import sqltune.train.budget as budget
import sqltune.train.sft as sft
from sqltune.cli import main
from sqltune.train.sft import train

KW = dict(max_steps=10, logging_steps=1, save_steps=100, per_device_train_batch_size=2, warmup_ratio=0.0,
          lr_scheduler_type="cosine", learning_rate=1e-3)


@pytest.fixture
def minute_per_step(monkeypatch):
    """The training clock moves one minute at each optimizer step (the budget clock's tick)."""
    now = [0.0]
    monkeypatch.setattr(budget, "_now", lambda: now[0])
    tick = sft.BudgetClock.tick

    def ticking(self):
        now[0] += 60.0
        return tick(self)

    monkeypatch.setattr(sft.BudgetClock, "tick", ticking)
    return now


def learning_rates(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["learning_rate"] for r in rows if "loss" in r]


def test_budget_cut_schedule_is_said(tiny_model, prepared_demo, tmp_path, monkeypatch, capsys):
    """Pins: a run stopped by --max_train_minutes ended silently with its cosine cut mid-way (the 45-minute Spider run
    stopped at step 207 of 250 at a third of its peak rate); now it says so, and the figures hold the planned steps."""
    now = [0.0]

    def clock():  # the budget clock is read once at the start and once per step
        now[0] += 60.0
        return now[0]

    monkeypatch.setattr(budget, "_now", clock)
    figures = train(config(tiny_model, prepared_demo, tmp_path / "cut", max_train_minutes=3, **KW))
    assert figures["steps"] < figures["planned_steps"] == 10
    assert figures["final_learning_rate"] > 0.5e-3  # still high: the schedule was cut
    err = capsys.readouterr().err
    assert f"the time budget stopped training at step {figures['steps']} of 10" in err
    assert "--schedule_to_budget" in err


def test_schedule_ends_with_the_budget(tiny_model, prepared_demo, tmp_path, minute_per_step, capsys):
    """Pins --schedule_to_budget: with 5 minutes for 10 planned steps of one minute each, the cosine runs on the
    budget's clock (step k runs at the rate of k-1 minutes of 5), training stops when the budget is spent, and
    nothing is said about a cut."""
    figures = train(config(tiny_model, prepared_demo, tmp_path / "b", max_train_minutes=5, schedule_to_budget=True,
                           **KW))
    assert figures["steps"] == 5 and figures["planned_steps"] == 10
    import math
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
    assert learning_rates(tmp_path / "b") == pytest.approx(expected, rel=1e-6)
    assert "stopped training" not in capsys.readouterr().err


def test_schedule_is_unchanged_when_the_steps_end_first(tiny_model, prepared_demo, tmp_path, minute_per_step):
    """Pins: with a budget longer than the run, --schedule_to_budget changes nothing (same rates, same weights)."""
    plain = train(config(tiny_model, prepared_demo, tmp_path / "plain", **KW))
    budget = train(config(tiny_model, prepared_demo, tmp_path / "long", max_train_minutes=1000,
                          schedule_to_budget=True, **KW))
    assert learning_rates(tmp_path / "plain") == pytest.approx(learning_rates(tmp_path / "long"), rel=1e-9)
    assert budget["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-6) and budget["steps"] == 10


def test_resume_continues_the_budget(tiny_model, prepared_demo, tmp_path, minute_per_step):
    """Pins: the budget counts over a resume (the seconds spent are saved in each checkpoint); restarting the clock
    would raise the rate back and train 2 steps past the budget."""
    kw = {**KW, "max_train_minutes": 5, "schedule_to_budget": True, "save_steps": 2, "save_total_limit": 5}
    full = train(config(tiny_model, prepared_demo, tmp_path / "full", **kw))
    with training_killed_after_save(2), pytest.raises(Killed):
        train(config(tiny_model, prepared_demo, tmp_path / "cut", **kw))
    resumed = train(config(tiny_model, prepared_demo, tmp_path / "cut", resume=True, **kw))
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == full["steps"] == 5
    assert learning_rates(tmp_path / "cut") == pytest.approx(learning_rates(tmp_path / "full"), rel=1e-9)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)


def test_schedule_to_budget_needs_a_budget(tiny_model, prepared_demo, tmp_path, capsys):
    code = main(["train", "--model_name_or_path", str(tiny_model), "--dataset", "demo_train", "--dataset_dir",
                 str(prepared_demo), "--output_dir", str(tmp_path / "x"), "--schedule_to_budget"])
    err = capsys.readouterr().err
    assert code != 0 and "--schedule_to_budget needs --max_train_minutes" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
