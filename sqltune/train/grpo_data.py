"""What GRPO samples from: per prepared record, its prompt as token ids (encoded exactly as predict encodes it, so
the policy is trained on the prompts it will answer), its gold SQL and its database file (which the reward runs the
completions on). Records hold the rendered instruction, the question and the gold `output`, and their db_id; the
database folder is the dataset's `db_dir` in the registry (sqltune prepare writes it).

Every database is checked before anything is written: one line names a missing or unusable file (a broken file
would make every completion on it fail, and training would learn nothing from its questions, silently).
"""

from __future__ import annotations

from pathlib import Path

from sqltune.data.registry import lookup_many
from sqltune.errors import SqltuneError
from sqltune.io import database_path
from sqltune.sandbox import database_problem
from sqltune.templates import Template, encode_prompt

_SEPARATOR = "\u2063"  # invisible; only told apart two prompts whose ids decode to the same text (see prompt_rows)


def databases(dataset_dir: str, names: str, records: list[dict]) -> tuple[list[Path], bool]:
    """(each record's database file, whether the datasets are BIRD's). A db_id is looked for in the datasets'
    db_dir folders in the order the datasets are named; a missing or unusable file is one line."""
    entries = lookup_many(dataset_dir, names)
    folders = []
    for entry in entries:
        if not entry.get("db_dir"):
            raise SqltuneError(f"--stage grpo runs each completion on its database, but dataset {entry['file_name']} "
                               "names no db_dir in its registry (prepare it again with sqltune prepare)")
        if entry["db_dir"] not in folders:
            folders.append(entry["db_dir"])
    sources = {entry.get("source") for entry in entries}
    if "bird" in sources and len(sources) > 1:
        raise SqltuneError("--stage grpo scores BIRD and Spider-style datasets by different rules (BIRD's sets of "
                           "rows, Spider's EX): train on one kind at a time")
    found: dict[str, Path] = {}
    missing = []
    for record in records:
        db_id = str(record.get("db_id") or "")
        if db_id not in found:
            paths = [database_path(folder, db_id) for folder in folders]
            found[db_id] = next((p for p in paths if db_id and p.is_file()), paths[0])
            if not found[db_id].is_file():
                missing.append(str(found[db_id]))
    if missing:
        raise SqltuneError(f"--stage grpo needs each record's database; missing: {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    for path in sorted(set(found.values())):
        if why := database_problem(path):
            raise SqltuneError(f"--stage grpo needs usable databases; {path} is {why}")
    return [found[str(r.get("db_id") or "")] for r in records], sources == {"bird"}


def prompt_rows(records: list[dict], dbs: list[Path], tokenizer, template: Template, max_source_length: int
                ) -> tuple[dict[str, list], dict[str, list[int]], int]:
    """(dataset columns `prompt`, `gold`, `db_path`; prompt text -> token ids; prompts cut to max_source_length).

    TRL tokenises a text prompt itself (with the tokenizer's own special tokens), which is not how sqltune encodes a
    prompt (chat templates add none; a cut prompt may have no text at all), so the trainer is handed these ids
    instead (grpo.py) and `prompt` is the text they decode to, the key to them (two different ids that decode to the
    same text get an invisible separator appended)."""
    rows: dict[str, list] = {"prompt": [], "gold": [], "db_path": []}
    ids_of: dict[str, list[int]] = {}
    cut = 0
    for record, db in zip(records, dbs):
        ids, was_cut = encode_prompt(tokenizer, template, record, max_source_length)
        cut += was_cut
        key = tokenizer.decode(ids)
        while key in ids_of and ids_of[key] != ids:
            key += _SEPARATOR
        ids_of[key] = ids
        rows["prompt"].append(key)
        rows["gold"].append(record["output"])
        rows["db_path"].append(str(db))
    return rows, ids_of, cut
