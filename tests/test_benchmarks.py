"""The benchmark scripts' code paths, on the tiny model and the demo data (the real runs are in BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_spider_dev_benchmark_code_path(demo_dir, tiny_model, tmp_path):
    import spider_dev

    out = tmp_path / "bench"
    assert spider_dev.main(["--spider", str(demo_dir), "--model", str(tiny_model), "--dev_sample", "12",
                            "--train_examples", "16", "--train_minutes", "1", "--max_new_tokens", "6",
                            "--num_samples", "0", "--out", str(out)]) == 0  # greedy arms; votes: test_spider_dev_bench
    results = json.loads((out / "results.json").read_text())
    assert results["dev_questions"] == 12 and results["train_examples"] == 16
    assert set(results["results"]) == {"base", "finetuned"}
    assert results["results"]["finetuned"]["table"]["all"]["count"] == 12
    for stage in ("prepare", "predict_base", "train", "merge", "predict_finetuned", "evaluate_finetuned"):
        assert results["stages"][stage]["wall_s"] >= 0
    assert "| all | 12 |" in (out / "section.md").read_text()
    assert len((out / "dev_questions.txt").read_text().split()) == 12
