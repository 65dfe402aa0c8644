"""Where a training run writes, so that no input and no finished output is ever lost.

- Inputs first: every input is checked before anything is written, and an output folder that is, contains or lies
  inside an input (model folder, dataset folder or file, DeepSpeed config) is refused.
- The work folder holds the run's checkpoints, trainer_log.jsonl and sqltune_train.yaml (written at the start, so
  that `--resume` can compare settings). It is `output_dir` itself when that is absent or empty. When `output_dir`
  holds something and `--overwrite_output_dir` is given, the run works in the sibling `<output_dir>.partial`; the old
  output stays untouched until the new one is complete, then the partial folder is renamed onto `output_dir`.
- `--resume` continues the latest attempt: `<output_dir>.partial` when it exists (an unfinished run that replaces
  `output_dir`), else `output_dir`; from its latest complete checkpoint. A checkpoint is complete when it holds
  trainer_state.json (the Trainer writes it last) and model weights; newer incomplete ones (a kill during a save)
  are named and removed.
- A finished output holds train_figures.json, written last.
- One training per output folder: rank 0 holds `<output_dir>.lock` (beside the folder, which is replaced at the end)
  from the plan to the end; a second training of the same folder stops with one line naming the holder.

Nothing here imports torch, so `sqltune run` can look for checkpoints cheaply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import refuse_overlap
from sqltune.lock import held

FINISHED = "train_figures.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin", "pytorch_model.bin.index.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def is_complete(checkpoint: Path) -> bool:
    """trainer_state.json is the Trainer's last write to a checkpoint; the weights must be there too."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = [checkpoint / w for w in WEIGHTS] + list(checkpoint.glob("global_step*"))  # DeepSpeed keeps its own
    return any(w.exists() and (w.is_dir() or w.stat().st_size > 0) for w in weights)


def latest_checkpoint(folder: Path) -> tuple[Path | None, list[Path]]:
    """The latest complete checkpoint in `folder`, and the incomplete ones newer than it."""
    skipped = []
    for ckpt in reversed(checkpoints(Path(folder))):
        if is_complete(ckpt):
            return ckpt, skipped
        skipped.append(ckpt)
    return None, skipped


def attempt_dir(out: Path) -> Path:
    """The folder of the latest attempt: the partial folder of an unfinished replacing run, else the output."""
    return partial_dir(out) if partial_dir(out).is_dir() else out


def resumable(out: str | Path) -> bool:
    """Whether `train --resume` would find a complete checkpoint for this output folder."""
    return latest_checkpoint(attempt_dir(Path(out)))[0] is not None


def lock(out: Path):
    """The lock of a training run's output folder (sqltune.lock); held from the plan until the folder is in place."""
    out = Path(os.path.abspath(out))
    return held(out.with_name(out.name + ".lock"), f"another training is writing {out}",
                "wait for it to finish or choose another --output_dir")


def check_overlap(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is, contains or lies inside an input."""
    refuse_overlap(out, inputs, "output_dir", "training")


def plan(out: Path, resume: bool, overwrite: bool) -> tuple[Path, Path | None, list[Path]]:
    """(work folder, checkpoint to resume or None, incomplete checkpoints to drop). Writes nothing."""
    if out.exists() and not out.is_dir():
        raise SqltuneError(f"output_dir {out} is a file, not a folder")
    if resume:
        folder = attempt_dir(out)
        ckpt, skipped = latest_checkpoint(folder)
        if ckpt is not None:
            return folder, ckpt, skipped
        detail = f" (incomplete: {', '.join(p.name for p in skipped)})" if skipped else ""
        raise SqltuneError(f"--resume: no complete checkpoint-* folder in {folder} to resume from{detail}")
    if not out.is_dir() or not any(out.iterdir()):
        return out, None, []
    if not overwrite:
        raise SqltuneError(f"output_dir {out} exists and is not empty (pass --overwrite_output_dir to replace "
                           "it, or --resume to continue its latest checkpoint)")
    return partial_dir(out), None, []


def prepare(out: Path, work: Path, resume: bool, skipped: list[Path]) -> None:
    """Rank 0, once every input has been checked: a fresh run starts from an empty work folder (a stale partial
    folder of an earlier attempt is ours to clear); a resumed run drops the incomplete checkpoints it skips."""
    if not resume and partial_dir(out).exists():
        shutil.rmtree(partial_dir(out))
    for ckpt in skipped:
        shutil.rmtree(ckpt, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)


def finish(out: Path, work: Path) -> None:
    """Put the finished work folder in place of `out` (two renames; the old output is removed last)."""
    if work == out:
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
