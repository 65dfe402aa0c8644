"""Predict's output files: where they go, what they were made from, where a run resumes, and how a finished run
takes its final names.

Files: a run appends one JSON line per record to `<out>.partial.raw.jsonl` (one write per batch; a torn last line is
dropped on resume), beside `<out>.partial.meta.json`, which says what the lines were made from. When every record
has its line, the `.sql` file is written from them and the three files take their final names `<out>`,
`<out>.raw.jsonl`, `<out>.meta.json`; the meta names its .sql by digest, and a file at `<out>` is replaced only when
a meta names it. No file is written through a symbolic link. So a finished output is only ever replaced by another
finished one (with --overwrite as well), a failed or interrupted run leaves only partial files, and the next run
with the same settings continues them (counting records, not lines).

Identity: the meta holds a digest of the model's and the adapter's files (small files by content, weights over
64 MiB by size and modification time), a digest of the records answered, the resolved template, prompt length and
history mode, and the generation settings; never a path string. A finished output or a partial run whose meta
differs is another run's: an error naming what differs, unless --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from sqltune.config import PredictConfig, to_dict
from sqltune.errors import SqltuneError
from sqltune.io import atomic_write, interaction_text, read_json, read_jsonl, refuse_link, truncate, write_json
from sqltune.lock import held

NOT_IDENTITY = {"model_name_or_path", "adapter", "dataset", "dataset_dir", "out", "batch_size", "overwrite",
                "attn_implementation", "tensor_parallel_size", "gpu_memory_utilization", "enforce_eager", "kv_cache_gb",
                "kv_block_size", "quiet"}
# written for an empty answer: the official Spider evaluator drops blank lines (every later answer then meets the gold
# of the question before it), and in a SParC/CoSQL file a blank line ends the interaction
NO_SQL = "SELECT"


def side_files(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".raw.jsonl"), out.with_name(out.name + ".meta.json")


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: Path, folders: list[Path], files: list[Path]) -> None:
    """--out must not be a folder, lie inside an input folder, or be (or share a file name with) an input."""
    if out.is_dir():
        raise SqltuneError(f"--out {out} is a folder; give a file name such as {out / 'pred.sql'}")
    target = out.resolve()
    for folder in folders:
        if _inside(target, folder.resolve()):
            raise SqltuneError(f"--out {out} lies inside the input folder {folder}: write predictions elsewhere")
    written = {target, *(p.resolve() for p in (*side_files(out), partial_of(out), *side_files(partial_of(out))))}
    for path in files:
        if path.resolve() in written:
            raise SqltuneError(f"--out {out} would overwrite the input {path}: choose another file name")


@contextmanager
def output_lock(out: Path):
    """Hold `<out>.lock` for the whole run; a second predict on the same --out gets one line naming the holder. The
    lock file is removed when the run ends (sqltune.lock)."""
    with held(out.with_name(out.name + ".lock"), f"another predict is writing {out}",
              "wait for it to finish or choose another --out"):
        yield


def _meta_of(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _identity(meta: dict | None) -> dict | None:
    """The settings that decide the output. An option added since a meta was written is absent from it and read
    as its default (a new option's default keeps the old behaviour), so adding one does not end every resume."""
    if meta is None:
        return None
    defaults = {k: v for k, v in to_dict(PredictConfig()).items() if k not in NOT_IDENTITY}
    return {**defaults, **{k: v for k, v in meta.items() if k != "about"}}


def _differences(old: dict | None, new: dict) -> str:
    if old is None:
        return "it has no readable meta file"
    names = {"model_sha256": "model", "adapter_sha256": "adapter", "records_sha256": "records",
             "databases_sha256": "databases"}
    keys = [names.get(k, k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "different " + ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def _valid_rows(raw: Path, records: list[dict], predicted: bool) -> int:
    """Records of `raw` that are whole and in order; the rest is cut off the file. With predicted history the cut
    goes back to the start of an interaction (its turns were generated and written together)."""
    if not raw.is_file():
        return 0
    data = raw.read_bytes()
    pos = n = 0
    while n < len(records):
        end = data.find(b"\n", pos)
        if end < 0:
            break
        try:
            row = json.loads(data[pos:end])
        except ValueError:
            break
        if not isinstance(row, dict) or row.get("index") != n:
            break
        pos, n = end + 1, n + 1
    if predicted:
        while 0 < n < len(records) and records[n].get("interaction") == records[n - 1].get("interaction"):
            n -= 1
            pos = data.rfind(b"\n", 0, pos - 1) + 1
    if pos != len(data):
        truncate(raw, pos)
    return n


def _names(meta: dict | None, out: Path) -> bool:
    """Whether a meta names this very output: it holds the digest of the .sql file now at `out` (a stray or copied
    meta, `{}` say, never vouches for a file predict did not write)."""
    about = meta.get("about") if isinstance(meta, dict) else None
    want = about.get("sql_sha256") if isinstance(about, dict) else None
    return isinstance(want, str) and out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == want


def resume_point(out: Path, meta: dict, records: list[dict], overwrite: bool, predicted: bool) -> int | None:
    """Records this run has already answered in its partial files; None when `out` is finished with these settings.
    A finished output or partial run of other settings is an error unless `overwrite`; a file at `out` that no meta
    names is never replaced, and a link among the files is refused (never followed)."""
    meta_path = side_files(out)[1]
    part_raw, part_meta = side_files(partial_of(out))
    for path in (out, *side_files(out), part_raw, part_meta):
        refuse_link(path, "--out's file")
    old_meta, old_part = _meta_of(meta_path), _meta_of(part_meta)
    if out.exists() and not _names(old_meta, out) and not _names(old_part, out):
        raise SqltuneError(f"{out} exists and is not a prediction file of sqltune (no {meta_path.name} naming it "
                           "beside it): predict does not replace it, even with --overwrite; choose another --out, or "
                           "remove it yourself if it is not needed")
    if overwrite:
        return 0
    if _names(old_meta, out) and _identity(old_meta) == _identity(meta):
        return None
    if _identity(old_part) == _identity(meta):
        return _valid_rows(part_raw, records, predicted)
    if out.exists():
        why = _differences(_identity(old_meta), _identity(meta))
        raise SqltuneError(f"{out} holds predictions of another run ({why}); pass --overwrite to replace them (they "
                           "stay until the new run is complete)")
    if part_raw.exists() or part_meta.exists():
        why = _differences(_identity(old_part), _identity(meta))
        raise SqltuneError(f"{part_raw} holds an unfinished run with other settings ({why}); pass --overwrite to "
                           "start again")
    return 0


def _one_line(sql: str) -> str:
    return sql.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def sql_text(rows: list[dict]) -> str:
    """The .sql file: one line per record (NO_SQL for an empty answer); for multi-turn records a blank line after
    each interaction, as the gold file has (interaction_text)."""
    return interaction_text([(row.get("interaction"), _answer_line(row["sql"])) for row in rows])


def _answer_line(sql: str) -> str:
    line = _one_line(sql)
    return line if line.strip() else NO_SQL


def publish(out: Path) -> None:
    """Give a complete partial run its final names. The meta names the .sql it describes (its digest) and is
    written before it, so a crash at any point leaves a .sql that a meta names, or the old files."""
    raw, meta_path = side_files(out)
    part_raw, part_meta = side_files(partial_of(out))
    text = sql_text(list(read_jsonl(part_raw)))
    meta = read_json(part_meta)
    write_json(part_meta, {**meta, "about": {**meta.get("about", {}),
                                             "sql_sha256": hashlib.sha256(text.encode()).hexdigest()}})
    with atomic_write(out) as handle:
        handle.write(text)
    os.replace(part_raw, raw)
    os.replace(part_meta, meta_path)



def output_totals(rows: list[dict], voted: bool) -> dict:
    """Figures of the whole output, earlier sessions of a resumed run included: prompts cut, new tokens and, with a
    vote, the questions where no candidate ran (the greedy answer was written)."""
    totals = {"prompts_cut": sum(bool(r.get("prompt_cut")) for r in rows),
              "new_tokens": sum(r.get("new_tokens") or 0 for r in rows)}
    if voted:
        totals["no_candidate_ran"] = sum(bool((r.get("vote") or {}).get("fallback")) for r in rows)
    return totals

