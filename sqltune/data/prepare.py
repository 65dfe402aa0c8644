"""The prepare stage: a dataset in a known layout -> supervised JSONL records, gold files and a registry entry."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm import tqdm

from sqltune.config import PrepareConfig
from sqltune.data.examples import Example, SourceData
from sqltune.data.prompts import fit_schema, make_record
from sqltune.data.registry import register
from sqltune.data.schema import render_schema
from sqltune.data.sources import load_source
from sqltune.errors import SqltuneError
from sqltune.io import atomic_write, write_jsonl


def token_counter(tokenizer_path: str) -> Callable[[str], int]:
    """Count tokens with the given tokenizer, or whitespace words when none is given."""
    if not tokenizer_path:
        return lambda text: len(text.split())
    from transformers import AutoTokenizer  # only when asked: prepare stays light otherwise

    if not Path(tokenizer_path).is_dir():
        raise SqltuneError(f"tokenizer folder not found: {tokenizer_path}")
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _schema_cache(data: SourceData, cfg: PrepareConfig) -> Callable[[str], list[str]]:
    cache: dict[str, list[str]] = {}

    def get(db_id: str) -> list[str]:
        if db_id not in cache:
            if db_id not in data.tables:
                raise SqltuneError(f"database {db_id!r} is used by a question but has no schema in {data.tables_file}")
            path = data.db_path(db_id)
            cache[db_id] = render_schema(data.tables[db_id], cfg.schema_style, path if path.is_file() else None,
                                         cfg.sample_rows)
        return cache[db_id]

    return get


def write_gold(path: Path, examples: list[Example]) -> None:
    """`SQL<TAB>db_id` per line; a blank line between interactions for multi-turn sources."""
    with atomic_write(path) as handle:
        previous = None
        for ex in examples:
            if previous is not None and ex.interaction != previous:
                handle.write("\n")
            handle.write(f"{ex.query}\t{ex.db_id}\n")
            previous = ex.interaction


def prepare(cfg: PrepareConfig) -> dict:
    """Read the source, write `<name>_<split>.jsonl` (+ gold for non-train splits), register them; return figures."""
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    out = Path(cfg.out)
    data_dir = cfg.data_dir or (str(out / "demo_source") if cfg.source == "demo" else "")
    data = load_source(cfg.source, data_dir, splits)
    out.mkdir(parents=True, exist_ok=True)
    schema_of = _schema_cache(data, cfg)
    count = token_counter(cfg.tokenizer) if cfg.max_prompt_tokens else None
    figures: dict = {"source": cfg.source, "schema_style": cfg.schema_style}
    missing_dbs = sorted({ex.db_id for exs in data.splits.values() for ex in exs if not data.db_path(ex.db_id).is_file()})
    for split, examples in data.splits.items():
        name = f"{cfg.name}_{split}"
        records, cut = [], 0
        for ex in tqdm(examples, desc=f"prepare {name}", unit="q", leave=False, mininterval=1.0):
            blocks = schema_of(ex.db_id)
            if count is not None:
                blocks, was_cut = fit_schema(blocks, cfg.max_prompt_tokens, count)
                cut += was_cut
            records.append(make_record(ex.db_id, blocks, ex.question, ex.query, ex.history, ex.evidence))
        file_name = out / f"{name}.jsonl"
        write_jsonl(file_name, records)
        entry: dict = {"file_name": file_name, "source": cfg.source, "split": split, "records": len(records),
                       "schema_style": cfg.schema_style, "tables": data.tables_file.resolve(),
                       "db_dir": data.db_dir.resolve()}
        if split != "train":
            gold = out / f"{name}_gold.sql"
            write_gold(gold, examples)
            entry["gold"] = gold
            if any(ex.difficulty for ex in examples):
                diff = out / f"{name}_difficulty.txt"
                with atomic_write(diff) as handle:
                    handle.writelines(f"{ex.difficulty}\n" for ex in examples)
                entry["difficulty"] = diff
        register(out, name, entry)
        figures[f"{split}_records"] = len(records)
        if count is not None:
            figures[f"{split}_prompts_cut"] = cut
    figures["missing_databases"] = missing_dbs
    return figures
