"""The prepare stage: a dataset in a known layout -> supervised JSONL records, gold files and a registry entry.

Everything is built in memory first and written only when every split is ready: the files are staged beside the
output, renamed into place together, and the registry is updated once, so a failure never leaves a mix of a new and
an old preparation behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


from sqltune.config import PrepareConfig
from sqltune.data.dblinks import link_databases
from sqltune.data.examples import Example, Split
from sqltune.data.prompts import fit_schema, fits, make_instruction, make_record, make_turn_record
from sqltune.data.registry import read_registry, register_many
from sqltune.data.schema import render_schema
from sqltune.data.sources import load_source
from sqltune.errors import SqltuneError
from sqltune.io import interaction_text
from sqltune.progress import Progress
from sqltune.sandbox import Limits, Sandbox, count_rows, database_problem, default_workers

ROW_STYLES = ("ddl+rows", "mschema")  # styles that show sample_rows of data, which yield first to max_prompt_tokens
GOLD_TIMEOUT, GOLD_MAX_ROWS = 30.0, 100_000  # the evaluator's default bounds (evaluate --timeout, --max_rows)


def token_counter(tokenizer: str) -> Callable[[str], int]:
    """Count tokens with the given tokenizer (a folder or a catalog name), or whitespace words when none is given."""
    if not tokenizer:
        return lambda text: len(text.split())
    from sqltune.loading import load_tokenizer, resolve  # transformers only when asked: prepare stays light

    folder = Path(tokenizer).expanduser()
    tok = load_tokenizer(folder if folder.is_dir() else resolve(tokenizer))
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _schema_cache(cfg: PrepareConfig) -> Callable[[Split, str, int], list[str]]:
    """Schema blocks per (split's tables and databases, db_id, rows shown): BIRD's splits have different
    databases. A database file that cannot be used is named once (one warning per file, not per question or per
    number of rows tried); its schema is stated from the tables file."""
    cache: dict[tuple[str, str, int], list[str]] = {}
    warned: set[Path] = set()

    def warn(path: Path, why: str) -> None:
        if path not in warned:
            warned.add(path)
            say(f"warning: database {path} is unusable ({why}): its schema is stated from the tables file, without "
                "the file's column types, rows or values")

    def get(split: Split, db_id: str, rows: int) -> list[str]:
        path = split.db_path(db_id)
        key = (str(split.tables_file), str(path), rows)
        if key not in cache:
            if db_id not in split.tables:
                raise SqltuneError(f"database {db_id!r} is used by a question but has no schema in {split.tables_file}")
            cache[key] = render_schema(split.tables[db_id], cfg.schema_style, path if path.is_file() else None, rows,
                                       warn)
        return cache[key]

    return get


def schema_that_fits(blocks_with: Callable[[int], list[str]], rows: int, budget: int,
                     count: Callable[[str], int], evidence: str = "") -> tuple[list[str], bool, bool]:
    """(blocks, fewer rows shown, cut) for an instruction (evidence included) of at most `budget` tokens: example
    rows yield first (fewer rows per table, down to none), then blocks are cut from the end (`fit_schema`). A cut
    schema loses whole tables the model then invents; a row less costs only an example. "Fewer rows" means the
    schema text lost rows it would have shown (a database that is absent or empty has none to lose)."""
    asked = blocks = blocks_with(rows)
    while rows > 0 and not fits(blocks, budget, count, evidence):
        rows -= 1
        blocks = blocks_with(rows)
    blocks, cut = fit_schema(blocks, budget, count, evidence)
    return blocks, blocks_with(rows) != asked, cut


def gold_line(sql: str) -> str:
    """The gold file's one-line form of a query: line breaks become single spaces and the ends are stripped.
    TABs are kept: the evaluator splits a gold line on its last TAB, so a TAB inside a literal reads back unchanged."""
    return sql.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").strip()


def gold_text(examples: list[Example]) -> str:
    """`SQL<TAB>db_id` per line, in record order; for multi-turn sources a blank line after each interaction
    (interaction_text, which predict's files share)."""
    return interaction_text([(ex.interaction if ex.interaction >= 0 else None, f"{gold_line(ex.query)}\t{ex.db_id}")
                             for ex in examples])


def failing_gold(split: Split, quiet: bool = True) -> dict[int, str]:
    """Index -> why (`error`, `no rows`, `no database`) for each example whose gold query cannot teach a model
    anything checkable: it fails, times out or returns no rows; or its database file is absent or unusable (each
    unusable file named once, none of its queries run). Run in the sandbox (read-only, in worker processes
    killed past the evaluator's timeout, bounded in rows, bytes and memory), grouped by database."""
    why: dict[int, str] = {}
    todo = []
    usable: dict[Path, bool] = {}
    for i, ex in enumerate(split.examples):
        path = split.db_path(ex.db_id)
        if path not in usable:
            problem = database_problem(path) if path.is_file() else "absent"
            usable[path] = problem is None
            if problem and problem != "absent":
                say(f"warning: database {path} is unusable ({problem}): its train gold queries are not run")
        if usable[path]:
            todo.append((i, (str(path), ex.query)))
        else:
            why[i] = "no database"
    if not todo:
        return why
    limits = Limits(timeout=GOLD_TIMEOUT, max_rows=GOLD_MAX_ROWS)
    bar = Progress(len(todo), "run train gold", "q", quiet=quiet, leave=False)
    try:
        with Sandbox(default_workers(0, len({item[0] for _, item in todo})), limits) as sandbox:
            counts = sandbox.map(count_rows, [item for _, item in todo], key=lambda item: item[0],
                                 on_fail=lambda item, reason, phase, step: None, progress=bar.update)
    finally:
        bar.close()
    for (i, _), count in zip(todo, counts):
        if count is None:
            why[i] = "error"
        elif count == 0:
            why[i] = "no rows"
    return why


def sample_indices(has_database: list[bool], n: int, seed: int) -> list[int]:
    """Sorted indices of a seeded sample of `n` questions among those whose database exists (all of those when `n`
    is 0 or not fewer): the one rule `prepare --dev_sample` and `--train_sample` and benchmarks/spider_dev.py share, so that a recipe and
    the benchmark score the same questions."""
    eligible = [i for i, ok in enumerate(has_database) if ok]
    return sorted(random.Random(seed).sample(eligible, n)) if 0 < n < len(eligible) else eligible


def _split_sample(cfg: PrepareConfig, split: str, n: int, entry: dict, part: Split, no_db: set[str],
                  files: dict[str, str]) -> tuple[str, dict]:
    """`<name>_<split><N>`: the records (with gold and difficulty lines where the split has them) of a seeded sample
    of `n` of the split's questions (drawn among those whose database is not in `no_db`), added to `files`; its
    registry entry says what it samples. --dev_sample is benchmarks/spider_dev.py's rule; --train_sample spreads the
    questions a recipe samples candidates for over the split's databases (Spider's train file runs database by
    database: its first 500 questions are 10 databases). Multi-turn splits are refused (a question there leans on
    its turns)."""
    if any(ex.interaction >= 0 for ex in part.examples):
        raise SqltuneError(f"--{split}_sample samples single questions; {cfg.source}'s {split} split is interactions")
    name = f"{cfg.name}_{split}{n}"
    picked = sample_indices([ex.db_id not in no_db for ex in part.examples], n, cfg.seed)
    if len(picked) < n:
        say(f"{name}: only {len(picked)} {split} questions have their database: all of them are the sample")
    sample = dict(entry, records=len(picked), sample_of=f"{cfg.name}_{split}", seed=cfg.seed)
    for key, suffix in (("file_name", ".jsonl"), ("gold", "_gold.sql"), ("difficulty", "_difficulty.txt")):
        if key in entry:
            lines = files[f"{cfg.name}_{split}{suffix}"].split("\n")  # "\n" alone ends a line, as the readers split
            files[f"{name}{suffix}"] = "".join(lines[i] + "\n" for i in picked)
            sample[key] = Path(cfg.out) / f"{name}{suffix}"
    return name, sample


def _write_all(out: Path, files: dict[str, str]) -> None:
    """Write every file into a staging folder inside `out`, then rename them into place together."""
    stage = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        for name, text in files.items():
            with open(stage / name, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        for name in files:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def say(text: str) -> None:
    print(f"prepare: {text}", file=sys.stderr, flush=True)


def prepare(cfg: PrepareConfig) -> dict:
    """Read the source, write `<name>_<split>.jsonl` (+ gold for non-train splits), register them; return figures."""
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    if not splits:
        raise SqltuneError("--splits names no split (e.g. train,dev)")
    if cfg.dev_sample and "dev" not in splits:
        raise SqltuneError(f"--dev_sample samples the dev split, which --splits {cfg.splits} leaves out")
    if cfg.train_sample and "train" not in splits:
        raise SqltuneError(f"--train_sample samples the train split, which --splits {cfg.splits} leaves out")
    out = Path(cfg.out)
    data_dir = cfg.data_dir or (str(out / "demo_source") if cfg.source == "demo" else "")
    data_dir = cfg.db_dir if cfg.source == "sqlite" else data_dir
    data = load_source(cfg.source, data_dir, splits, cfg)
    if out.resolve() == Path(data_dir).resolve() or Path(data_dir).resolve() in out.resolve().parents:
        raise SqltuneError(f"--out {out} is inside the source folder {data_dir}: write prepared data elsewhere")
    read_registry(out)  # a broken registry is reported before anything is written
    schema_of = _schema_cache(cfg)
    count = token_counter(cfg.tokenizer) if cfg.max_prompt_tokens else None
    if count is not None and not fits(["x"], cfg.max_prompt_tokens, count):
        fixed = count(make_instruction([]))
        raise SqltuneError(f"--max_prompt_tokens {cfg.max_prompt_tokens} leaves no room for the schema: the "
                           f"instruction's fixed text alone is {fixed} tokens")
    figures: dict = {"source": cfg.source, "schema_style": cfg.schema_style, **_source_notes(data, data_dir)}
    files: dict[str, str] = dict(data.files)
    entries: dict[str, dict] = {}
    missing_dbs: set[str] = set()
    for split, part in data.splits.items():
        name = f"{cfg.name}_{split}"
        multi_turn = any(ex.interaction >= 0 for ex in part.examples)
        history = "gold" if split == "train" else cfg.history
        no_db = {ex.db_id for ex in part.examples if not part.db_path(ex.db_id).is_file()}
        dropped = None
        if cfg.drop_failing_gold and split == "train":
            part, dropped = _drop_failing_gold(part, name, cfg.quiet)
            figures[f"{split}_dropped_failing_gold"] = dropped
        without_db = sum(ex.db_id in no_db for ex in part.examples)  # of the records kept
        records, fitting = _records(cfg, part, name, history, schema_of, count)
        about = ({"history": history} if multi_turn else {}) | \
            ({"dropped_failing_gold": dropped} if dropped is not None else {})
        entries[name] = entry = _split_files(cfg, name, split, part, records, files, about)
        n = {"dev": cfg.dev_sample, "train": cfg.train_sample}.get(split, 0)
        if n:
            sample_name, entries[sample_name] = _split_sample(cfg, split, n, entry, part, no_db, files)
            figures[f"{split}_sample_records"] = entries[sample_name]["records"]
        missing_dbs |= no_db
        figures[f"{split}_records"] = len(records)
        figures[f"{split}_records_without_database"] = without_db
        if count is not None:
            figures.update(_fitting_figures(cfg, split, name, fitting))
        say(f"{name}: {len(records)} records ({cfg.schema_style}"
            + (f", history {history}" if multi_turn else "")
            + (f"; {without_db} whose database is missing from {part.db_dir}" if without_db else "") + ")")
    out.mkdir(parents=True, exist_ok=True)
    _write_all(out, files)
    for folder, databases in {part.db_dir: part.databases for part in data.splits.values() if part.databases}.items():
        link_databases(folder, databases)
    register_many(out, entries)
    figures["missing_databases"] = sorted(missing_dbs)
    return figures


def _source_notes(data, data_dir: str) -> dict:
    """Figures (and a line each) for what the source lacked: splits absent from it, input pairs it left out."""
    figures: dict = {}
    if data.missing_splits:
        missing = ", ".join(data.missing_splits)
        say(f"no {missing} split in {data_dir}: prepared {', '.join(data.splits)} only")
        figures["missing_splits"] = missing
    for why, named in data.left_out.items():  # input pairs the source could not use
        figures[f"left_out_{why}"] = len(named)
        if named:
            say(f"left out {len(named)} pairs ({why.replace('_', ' ')}): " + "; ".join(named[:5])
                + ("; ..." if len(named) > 5 else ""))
    return figures


def _drop_failing_gold(part: Split, name: str, quiet: bool) -> tuple[Split, int]:
    """The split without the examples whose gold query fails, returns no rows or has no database; how many went."""
    why = failing_gold(part, quiet)
    kinds = {k: sum(v == k for v in why.values()) for k in ("error", "no rows", "no database")}
    say(f"{name}: dropped {len(why)} records whose gold query fails or returns no rows ("
        + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")")
    return dataclasses.replace(part, examples=[ex for i, ex in enumerate(part.examples) if i not in why]), len(why)


@dataclasses.dataclass
class _Fitting:
    """How a split's instructions met --max_prompt_tokens: how many had their schema cut, showed fewer example rows,
    or stayed over the budget anyway (their evidence alone is too long)."""
    cut: int = 0
    fewer_rows: int = 0
    over: int = 0


def _records(cfg: PrepareConfig, part: Split, name: str, history: str,
             schema_of: Callable[[Split, str, int], list[str]], count: Callable[[str], int] | None
             ) -> tuple[list[dict], _Fitting]:
    """A split's records, each instruction with its database's schema, fitted into --max_prompt_tokens when `count`
    is given (once per database and evidence: they alone decide the fit)."""
    records: list[dict] = []
    fitting = _Fitting()
    rows_asked = cfg.sample_rows if cfg.schema_style in ROW_STYLES else 0
    fitted: dict[tuple[str, str], tuple[list[str], bool, bool, bool]] = {}  # blocks, fewer rows, cut, over
    bar = Progress(len(part.examples), f"prepare {name}", "q", quiet=cfg.quiet, leave=False)
    for ex in part.examples:
        if count is None:
            blocks = schema_of(part, ex.db_id, rows_asked)
        else:
            key = (ex.db_id, ex.evidence)
            if key not in fitted:
                blocks, fewer, was_cut = schema_that_fits(lambda n: schema_of(part, ex.db_id, n), rows_asked,
                                                          cfg.max_prompt_tokens, count, ex.evidence)
                fitted[key] = blocks, fewer, was_cut, not fits(blocks, cfg.max_prompt_tokens, count, ex.evidence)
            blocks, fewer, was_cut, too_long = fitted[key]
            fitting.cut += was_cut
            fitting.fewer_rows += fewer
            fitting.over += too_long
        if ex.interaction >= 0:
            records.append(make_turn_record(ex.db_id, blocks, ex.question, ex.query, ex.history, ex.interaction,
                                            ex.turn, history))
        else:
            records.append(make_record(ex.db_id, blocks, ex.question, ex.query, ex.history, ex.evidence))
        bar.update()
    bar.close()
    return records, fitting


def _split_files(cfg: PrepareConfig, name: str, split: str, part: Split, records: list[dict],
                 files: dict[str, str], about: dict) -> dict:
    """The split's files added to `files` (its records; beside a split other than train its gold lines and, when
    the source grades questions, their difficulty); returns its registry entry, `about` (what else it records)
    among its fields."""
    out = Path(cfg.out)
    files[f"{name}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    entry: dict = {"file_name": out / f"{name}.jsonl", "source": cfg.source, "split": split,
                   "records": len(records), "schema_style": cfg.schema_style,
                   "tables": part.tables_file.resolve(), "db_dir": part.db_dir.resolve(), **about}
    if split != "train":
        files[f"{name}_gold.sql"] = gold_text(part.examples)
        entry["gold"] = out / f"{name}_gold.sql"
        if any(ex.difficulty for ex in part.examples):
            files[f"{name}_difficulty.txt"] = "".join(f"{ex.difficulty}\n" for ex in part.examples)
            entry["difficulty"] = out / f"{name}_difficulty.txt"
    return entry


def _fitting_figures(cfg: PrepareConfig, split: str, name: str, fitting: _Fitting) -> dict:
    """The split's figures of --max_prompt_tokens; a line when instructions stay over it."""
    figures = {f"{split}_prompts_cut": fitting.cut}
    if cfg.schema_style in ROW_STYLES:
        figures[f"{split}_prompts_with_fewer_rows"] = fitting.fewer_rows
    if fitting.over:
        figures[f"{split}_prompts_over_budget"] = fitting.over
        say(f"{name}: {fitting.over} instructions are longer than --max_prompt_tokens {cfg.max_prompt_tokens} even "
            "with their schema cut to a word: their evidence alone does not fit")
    return figures
