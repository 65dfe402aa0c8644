"""`sqltune run` on a BIRD dev set: its evaluate stage scores with BIRD's rules and difficulty file, which it takes
from the dataset registry that prepare wrote."""

from __future__ import annotations

import json

import pytest
from bird_fixture import QUESTIONS, build_bird

from sqltune.data.registry import lookup
from sqltune.pipeline import execute, read_plan


def bird_run(tmp_path, evaluate: str = "{etype: exec}"):
    """A run of prepare and evaluate on the BIRD fixture, its prediction file written by hand (the second answer
    wrong); returns the run folder and the metrics evaluate wrote."""
    recipe = tmp_path / "bird.yaml"
    recipe.write_text(f"name: b\nstages: [prepare, evaluate]\nprepare: {{source: bird, data_dir: "
                      f"{build_bird(tmp_path / 'bird')}}}\nevaluate: {evaluate}\n")
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    answers = [q["SQL"].replace("\n", " ") for q in QUESTIONS["dev"]]
    answers[1] = "SELECT superhero_name FROM hero WHERE id = 1"
    (run / "predictions" / "base.sql").write_text("".join(f"{a}\n" for a in answers))
    execute(read_plan(str(recipe)), run, force=False)
    return run, json.loads((run / "eval" / "base" / "metrics.json").read_text())


def test_bird_dev_set_is_scored_with_birds_rules_and_difficulties(tmp_path):
    """Pins: `run` scored a BIRD dev set with Spider's rules (its hardness from the SQL, not BIRD's difficulty
    column) unless the recipe said `bird: true`, and never read the difficulty file prepare wrote; the registry
    entry says it is BIRD and where its difficulties are, and evaluate takes both from there."""
    run, metrics = bird_run(tmp_path)
    entry = lookup(run / "data", "bird_dev")
    assert entry["source"] == "bird" and entry["difficulty"].endswith("bird_dev_difficulty.txt")
    table = metrics["bird"]
    assert {k: (v["count"], v["exec"]) for k, v in table.items()} == \
        {"simple": (1, 1.0), "moderate": (1, 0.0), "challenging": (1, 1.0), "total": (3, pytest.approx(2 / 3))}


def test_the_recipe_still_decides(tmp_path):
    """A recipe that sets `bird: false` is scored with Spider's rules on a BIRD dev set, as it asks."""
    _, metrics = bird_run(tmp_path, "{etype: exec, bird: false}")
    assert "bird" not in metrics and "scores" in metrics  # Spider's table, by the SQL's hardness
