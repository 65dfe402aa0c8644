"""Settings of `sqltune samples`: the candidates of `predict --num_samples N` on a train split turned into training
data (sqltune/samples.py). Apart from settings.py, which holds the stages' settings."""

from __future__ import annotations

from dataclasses import dataclass

from sqltune.config.settings import _check, arg, shown


@dataclass
class SamplesConfig:
    samples: str = arg("", "predict's raw file, <out>.raw.jsonl, of `predict --num_samples N --vote execution` (or "
                           "--retry_on_error) on a train split; its <out>.meta.json must lie beside it")
    dataset: str = arg("", "the registry name predict answered (default: the one its meta file names)")
    dataset_dir: str = arg("data/prepared", "folder holding dataset_info.json; the new files are written and "
                                            "registered here")
    name: str = arg("", "registry name of the new dataset: <name>.jsonl (records of right candidates), "
                        "<name>_pairs.jsonl (preference pairs), <name>.meta.json (the counts), and <name>_mixed "
                        "(<name>_mixed.jsonl: the records of questions whose candidates are partly right, partly "
                        "wrong: GRPO's data)")
    max_per_question: int = arg(4, "distinct right candidates kept per question as records (greedy first, then "
                                   "the samples in the order drawn)")
    max_pairs_per_question: int = arg(4, "preference pairs kept per question (a right and a wrong candidate of its "
                                         "prompt; wrong ones that run come before those that fail)")
    workers: int = arg(0, "processes running candidates against the gold (0 = number of cores)")
    quiet: bool = arg(False, "no progress bar")

    def __post_init__(self):
        _check(bool(self.samples), "--samples is required (predict's <out>.raw.jsonl)")
        _check(bool(self.name), "--name is required (the registry name of the new dataset)")
        _check(all(c.isascii() and (c.isalnum() or c in "_-.") for c in self.name) and not self.name.startswith("."),
               f"--name must be a plain name (letters, digits, _, -, and . not first), not {shown(self.name)}")
        _check(self.max_per_question >= 0 and self.max_pairs_per_question >= 0,
               "--max_per_question and --max_pairs_per_question must be >= 0")
        _check(self.max_per_question + self.max_pairs_per_question > 0,
               "--max_per_question and --max_pairs_per_question are both 0: nothing would be kept")
        _check(self.workers >= 0, "--workers must be >= 0")
