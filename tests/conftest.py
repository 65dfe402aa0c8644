"""Shared test fixtures: offline settings, the path to ../shared, and small Spider-layout data made by our code."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SPIDER = SHARED / "spider"
EVAL_CASES = SHARED / "spider-eval-cases"

needs_spider = pytest.mark.skipif(not (SPIDER / "dev.json").is_file(),
                                  reason="../shared/spider is absent (the real Spider lives beside the checkout)")
needs_eval_cases = pytest.mark.skipif(not (EVAL_CASES / "official_figures.json").is_file() or
                                      not (SPIDER / "database").is_dir(),
                                      reason="../shared/spider-eval-cases or ../shared/spider is absent")


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path, monkeypatch):
    """Keep trace files of CLI calls inside the test's own folder."""
    monkeypatch.setenv("SQLTUNE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("SQLTUNE_TRACE", raising=False)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small Spider-layout dataset made by sqltune's own generator (3 databases, 80 train, 30 dev)."""
    from sqltune.data.demo import generate

    out = tmp_path_factory.mktemp("demo")
    generate(out, seed=0, train=80, dev=30)
    return out


@pytest.fixture(scope="session")
def demo_db(demo_dir) -> Path:
    return demo_dir / "database"


@pytest.fixture(scope="session")
def prepared_demo(demo_dir, tmp_path_factory) -> Path:
    """The demo data prepared into records (registry names demo_train, demo_dev)."""
    from sqltune.config import PrepareConfig
    from sqltune.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(PrepareConfig(data_dir=str(demo_dir), out=str(out), name="demo"))
    return out


@pytest.fixture(scope="session")
def tiny_model(prepared_demo, tmp_path_factory) -> Path:
    """A random Llama (hidden 64, 2 layers) with a BPE tokenizer trained on the demo records."""
    import json

    from sqltune.testing import build_tiny_llama

    corpus = []
    for line in open(prepared_demo / "demo_train.jsonl"):
        r = json.loads(line)
        corpus += [r["instruction"], r["input"], r["output"]]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", corpus)


class Killed(Exception):
    """Stands for the process being killed in the middle of training."""


@contextmanager
def training_killed_after_save(step: int):
    """Within the block, `sqltune train` dies right after it has written checkpoint-<step>."""
    from transformers import TrainerCallback

    import sqltune.train.sft as sft

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == step:
                raise Killed()

    original = sft._callbacks
    sft._callbacks = lambda *a: original(*a) + [Kill()]
    try:
        yield
    finally:
        sft._callbacks = original


@contextmanager
def predict_killed_at_batch(batch: int):
    """Within the block, `sqltune predict` is interrupted (KeyboardInterrupt) when it starts its `batch`-th batch."""
    from sqltune.infer.hf_backend import HFGenerator

    original = HFGenerator.generate
    calls = {"n": 0}

    def dies(self, prompts):
        calls["n"] += 1
        if calls["n"] == batch:
            raise KeyboardInterrupt
        return original(self, prompts)

    HFGenerator.generate = dies
    try:
        yield
    finally:
        HFGenerator.generate = original
