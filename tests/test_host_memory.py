"""Host memory in training: the heap a step freed goes back to the system, and the log says how much is resident."""

from __future__ import annotations

import json
import sys

import pytest

from sqltune.train.host_memory import give_back_freed_memory, resident_mb

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or give_back_freed_memory() is False,
                           reason="malloc_trim is glibc's (Linux); elsewhere freed memory is the allocator's business")


@glibc
def test_memory_freed_below_a_live_block_goes_back():
    """Pins the mechanism behind a CPU run's growth (23 GB over a 210-step run at batch 8 on this 24 GB machine):
    after glibc has freed a large block it keeps later blocks below 32 MB on its heap, and what is freed under a block
    still in use stays resident. Without give_back_freed_memory the 120 MB freed here stays resident; with it, it
    leaves."""
    import torch

    torch.empty(24 * 2**20, dtype=torch.uint8).fill_(1)  # freed at once: glibc raises its mmap threshold past it
    before = resident_mb()
    blocks = [torch.ones(4 * 2**20, dtype=torch.uint8) for _ in range(60)]  # 240 MB, now on the heap
    grown = resident_mb()
    del blocks[::2]  # every other block freed: 120 MB of holes between blocks still in use
    kept = resident_mb()
    assert give_back_freed_memory()
    after = resident_mb()
    assert grown - before > 200, (before, grown)
    assert kept - after > 100, (before, grown, kept, after)  # what glibc kept, handed back


def test_training_logs_resident_memory_and_trims_on_request(tiny_model, prepared_demo, tmp_path, monkeypatch):
    """Pins: each logged step of a training records the process's resident memory (`rss_mb`), where a run's growth can
    be read; --trim_host_memory_every N hands the freed heap back after every N-th step and only then (sft, dpo and
    grpo share make_callbacks, so all three stages do), and by default never."""
    import sqltune.train.host_memory as host_memory
    from sqltune.config import TrainConfig
    from sqltune.train.sft import train

    trims = []
    monkeypatch.setattr(host_memory, "give_back_freed_memory", lambda: trims.append(1) or True)
    cfg = dict(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(prepared_demo),
               template="chatml", max_steps=4, logging_steps=1, per_device_train_batch_size=2, lora_dropout=0.0,
               quiet=True)
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "plain")))
    assert trims == []
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "trimmed"), trim_host_memory_every=2))
    assert len(trims) == 2  # after steps 2 and 4
    rows = [json.loads(line) for line in (tmp_path / "trimmed" / "trainer_log.jsonl").read_text().splitlines()]
    if resident_mb() is not None:
        assert all(r["rss_mb"] > 0 for r in rows), rows


def test_trim_every_must_not_be_negative():
    """Pins: a negative --trim_host_memory_every is one error line, not a silent never."""
    from sqltune.config import TrainConfig
    from sqltune.errors import SqltuneError

    with pytest.raises(SqltuneError, match="--trim_host_memory_every must be >= 0"):
        TrainConfig(trim_host_memory_every=-1)
