"""benchmarks/schema_styles.py (issue #16 §2): every style on the same questions, on the tiny model and demo data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import schema_styles


def test_every_style_on_the_same_questions(demo_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "styles"
    assert schema_styles.main(["--spider", str(demo_dir), "--model", str(tiny_model), "--dev_sample", "5",
                               "--max_new_tokens", "4", "--max_source_length", "256", "--predict_dtype", "float32",
                               "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["max_source_length"] == 256 and results["predict_dtype"] == "float32"
    assert "--max_source_length 256" in results["command"]  # a figure names the command that made it
    assert [r["style"] for r in results["rows"]] == ["words", "ddl", "ddl+rows", "mschema"]
    assert all(r["count"] == 5 for r in results["rows"])
    golds = {(out / s / "data" / "spider_devsample_gold.sql").read_text() for s in ("words", "ddl", "ddl_rows",
                                                                                    "mschema")}
    assert len(golds) == 1  # the same questions for every style
    assert "best zero-shot schema style" in capsys.readouterr().out
