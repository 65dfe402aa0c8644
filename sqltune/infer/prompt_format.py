"""The prompt format a model was trained with, read back from its training record, so that prediction (and `ask`)
word and cut prompts exactly as training did (`ask`, which states the schema itself, also reads the schema style
of the training data from the registry the record names).

Template and max_source_length default to the ones in the training record (`sqltune_train.yaml` of the adapter, or
of the model folder for a full fine-tune or a merged model (merge copies the adapter's), or of the adapter an older
merged model names in `sqltune_merge.json`), else auto and 1024. A max_source_length other than the trained one is
refused unless --template is given too (the user then sets the prompt format knowingly).
"""

from __future__ import annotations

import sys
from pathlib import Path

from sqltune.config import PredictConfig
from sqltune.errors import SqltuneError
from sqltune.io import read_json

TRAIN_RECORD = "sqltune_train.yaml"  # written by sqltune.train.sft next to the adapter or full model
MERGE_RECORD = "sqltune_merge.json"  # written by sqltune.infer.merge: which adapter a merged model holds
DEFAULT_LENGTH = 1024


def training_record(model: Path, adapter: Path | None) -> tuple[dict, Path | None]:
    """The settings the model was trained with: the adapter's record, else the model folder's (full fine-tune),
    else that of the adapter a merged model names.

    The record may come with a model folder from elsewhere: it is read with the bounded YAML loader (an alias bomb,
    a value YAML cannot build, text over 1 MiB, not UTF-8 or not a mapping is one line naming the file)."""
    from sqltune.config import parse_yaml

    if adapter is not None:
        folders = [adapter]
    else:
        folders = [model]
        merged = read_json(model / MERGE_RECORD) if (model / MERGE_RECORD).is_file() else {}
        if isinstance(merged, dict) and merged.get("adapter"):
            folders.append(Path(merged["adapter"]))
    for folder in folders:
        path = folder / TRAIN_RECORD
        if path.is_file():
            try:
                with open(path, "rb") as handle:
                    raw = handle.read((1 << 20) + 1)  # sft writes a few hundred bytes
                if len(raw) > 1 << 20:
                    raise SqltuneError(f"training record {path} is over 1 MiB: is it really sqltune's record?")
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SqltuneError(f"training record {path} is not UTF-8 text (byte {exc.start}): is it really "
                                   "sqltune's record?") from None
            except OSError as exc:
                raise SqltuneError(f"cannot read the training record {path}: {exc.strerror or exc}") from None
            data = parse_yaml(text, f"training record {path}")
            if data is None:
                return {}, path
            if not isinstance(data, dict):
                raise SqltuneError(f"training record {path} must hold a mapping of settings, not "
                                   f"{type(data).__name__}")
            return data, path
    return {}, None


def prompt_settings(cfg: PredictConfig, trained: dict, where: Path | None, who: str = "predict") -> tuple[str, int]:
    """(template, max_source_length): as given, else as in training, else auto and 1024. `cfg` is any config with
    those two fields (predict's, ask's); `who` names the command in a note."""
    t_template = trained.get("template") or trained.get("template_resolved")
    t_length = trained.get("max_source_length")
    if cfg.max_source_length and t_length and cfg.max_source_length != t_length and not cfg.template:
        raise SqltuneError(f"the model was trained with max_source_length {t_length} ({where}); "
                           f"--max_source_length {cfg.max_source_length} would cut prompts differently: leave it out, "
                           "or give --template as well to set the prompt format yourself")
    if cfg.template and t_template and cfg.template != t_template:
        print(f"{who}: note: the model was trained with template {t_template} ({where}); using --template "
              f"{cfg.template} as given", file=sys.stderr)
    return cfg.template or t_template or "auto", cfg.max_source_length or t_length or DEFAULT_LENGTH


def trained_schema_style(trained: dict) -> str | None:
    """The schema style of the data the model was trained on: prepare records it per dataset in dataset_info.json,
    and the training record names the datasets and their folder. None when any of that cannot be read (a record
    from elsewhere, data moved) or the datasets disagree."""
    from sqltune.data.registry import lookup

    names = [n.strip() for n in str(trained.get("dataset") or "").split(",") if n.strip()]
    folder = trained.get("dataset_path") or trained.get("dataset_dir")
    if not names or not isinstance(folder, str):
        return None
    try:
        styles = {lookup(folder, name).get("schema_style") for name in names}
    except (SqltuneError, OSError, ValueError, TypeError, AttributeError):  # a registry we cannot read
        return None
    return styles.pop() if len(styles) == 1 and None not in styles else None


def history_mode(cfg: PredictConfig, records: list[dict], entry: dict) -> str:
    """`none` (single-turn), `gold`/`questions` (multi-turn prompts as prepared) or `predicted`."""
    multi = any("interaction" in r for r in records)
    if cfg.history == "predicted":
        for i, r in enumerate(records):
            if not isinstance(r.get("question"), str) or "interaction" not in r or "turn" not in r:
                raise SqltuneError(f"--history predicted needs multi-turn records with `question`, `interaction` and "
                                   f"`turn` fields; record {i} of {entry['file_name']} lacks them (prepare it with "
                                   "--source sparc or cosql)")
        return "predicted"
    if not multi:
        return "none"
    return entry.get("history") or ("gold" if any(r.get("history") for r in records) else "questions")

