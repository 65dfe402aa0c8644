"""A run folder written by hand, as `sqltune run` leaves one (no model needed): a trace with memory figures, a
continued run (a failed then a finished attempt, skipped stages), a resolved config whose tuned arm voted, a GRPO-like
training log (loss, reward, reward_std), two evaluated arms with per-example failures, and hostile text (markup,
quotes, ampersands) where a run can carry a model's or a user's text: errors, failure kinds, file names."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
LEVELS = ("easy", "medium", "hard", "extra", "all")


def _span(stage: str, status: str = "ok", duration: float = 1.5, figures: dict | None = None, error=None,
          memory: dict | None = None, start: str = "2026-12-04T10:00:00") -> dict:
    return {"run_id": "demo-20261204-100000", "stage": stage, "start": start, "end": start, "duration_s": duration,
            "status": status, "figures": figures or {}, "error": error,
            "memory": memory if memory is not None else {"peak_rss_mb": 512.0, "peak_rss_mb_in_stage": True}}


def _metrics(ex: dict, em: dict, counts: dict) -> dict:
    scores = {lv: {"count": counts[lv], "em_count": counts[lv], "exec": ex[lv], "exact": em[lv], "partial": {}}
              for lv in LEVELS}
    return {"config": {"pred": "x.sql"}, "scores": scores, "multi_turn": False, "etype": "all", "ex": ex["all"],
            "em": em["all"], "count": counts["all"]}


def make_run(root: Path, name: str = "demo-20261204-100000") -> Path:
    run = root / name
    (run / "adapter").mkdir(parents=True)
    spans = [
        _span("prepare", figures={"train_records": 80, "dev_records": 10}),
        _span("train", "failed", 3.0, error=f"SqltuneError: {HOSTILE}"),
        _span("run", "failed", 5.0, error="SqltuneError: stopped"),
        _span("prepare", "skipped", 0.0, figures={"train_records": 80}, memory={}),
        _span("train", "ok", 125.0, figures={"train_loss": 0.5, "steps": 6},
              memory={"peak_rss_mb": 2048.0, "peak_rss_mb_in_stage": True, "gpu_peak_mb": 900.0,
                      "gpu_peak_mb_in_stage": True}),
        _span("predict_base", figures={"records": 10}, memory={"peak_rss_mb": 2048.0, "peak_rss_mb_in_stage": False}),
        _span("evaluate_base", figures={"ex": 0.3}),
        _span("predict_finetuned", figures={"records": 10}),
        _span("evaluate_finetuned", figures={"ex": 0.6}, memory={"peak_rss_mb": 2050.0, "peak_rss_mb_in_stage": True,
                                                                 "children_peak_rss_mb": 80.0,
                                                                 "children_peak_rss_mb_in_stage": True}),
        _span("run", "ok", 200.0, figures={"ex_base": 0.3, "ex_finetuned": 0.6}),
    ]
    (run / "trace.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans) + '{"cut by a ki\n')
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": "demo", "train": {"output_dir": str(run / "adapter")},
        "predict_base": {"num_samples": 0, "vote": "none"},
        "predict_finetuned": {"num_samples": 8, "vote": "execution", "include_greedy": True}}))
    log = [{"step": s, "loss": 2.0 / s, "reward": 0.1 * s, "reward_std": 0.05, "learning_rate": 1e-4}
           for s in range(1, 9)]
    (run / "adapter" / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
    (run / "adapter" / "checkpoint-4").mkdir()
    (run / "adapter" / "checkpoint-4" / "optimizer.pt").write_bytes(b"\0")
    (run / ".done").mkdir()
    (run / ".done" / "train.json").write_text("{}")
    counts = {"easy": 4, "medium": 3, "hard": 2, "extra": 1, "all": 10}
    arms = {"base": ({"easy": 0.5, "medium": 0.33, "hard": 0.0, "extra": 0.0, "all": 0.3},
                     {"easy": 0.25, "medium": 0.0, "hard": 0.0, "extra": 0.0, "all": 0.1},
                     ["wrong result"] * 4 + ["execution error: no such column"] * 3),
            "finetuned": ({"easy": 1.0, "medium": 0.67, "hard": 0.0, "extra": 0.0, "all": 0.6},
                          {"easy": 0.75, "medium": 0.33, "hard": 0.0, "extra": 0.0, "all": 0.4},
                          ["wrong result"] * 2 + [f"execution error: {HOSTILE}"] * 2)}
    for arm, (ex, em, failures) in arms.items():
        folder = run / "eval" / arm
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(_metrics(ex, em, counts)))
        rows = [{"index": i, "failure": failures[i] if i < len(failures) else None} for i in range(10)]
        rows.append({"index": 10, "failure": "gold query failed"})
        (folder / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "report.md").write_text("# report\n")
    (run / "predictions").mkdir()
    (run / "predictions" / 'odd "name" <&>.sql').write_text("SELECT 1\n")
    return run
