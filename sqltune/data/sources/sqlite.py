"""Your own data: question/SQL pairs over your own SQLite databases (`prepare --source sqlite --db_dir DIR --pairs
FILE`).

Pairs: JSONL (a `.json` file may hold one list instead), or CSV with a header row, each with `db_id`, `question`
and `query`. Databases: `DIR/<db_id>/<db_id>.sqlite` (Spider's layout) or `DIR/<db_id>.sqlite`. The dev split is
`--dev_pairs FILE`, or `--dev_fraction F` of the pairs drawn with `--seed` (pair by pair; records keep file order).

Nothing the user wrote goes in unchecked: every query is run once, read-only in the sandbox with the evaluator's
bounds, and a pair whose SQL fails or whose database is missing or unusable is left out, named and counted (a gold
answer that cannot run would teach nothing and count every prediction wrong). The schema comes from the databases
themselves (sqlite_tables: the tables.json entry the evaluator's exact match needs), written beside the records.
When some database lies flat in DIR, the split's db_dir is a folder of links in the Spider layout that prepare
writes (dblinks), the one layout evaluate and predict's vote read; when all are in the Spider layout, DIR itself.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from sqltune.data.examples import Example, SourceData, Split
from sqltune.data.sources.common import read_list, require_dir, text_field
from sqltune.data.sqlite_tables import readable_entry
from sqltune.errors import SqltuneError
from sqltune.sandbox import Limits, Sandbox, count_rows, database_problem, default_workers

KEYS = ("db_id", "question", "query")
SQL_TIMEOUT, SQL_MAX_ROWS = 30.0, 100_000  # the evaluator's default bounds (evaluate --timeout, --max_rows)
LEFT_OUT = ("missing_database", "failing_sql")
Pair = tuple[str, Example]  # (where it was read: "pairs.csv line 3", the example)


def _text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SqltuneError(f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} cannot be "
                           "decoded (save the file as UTF-8)") from None


def _jsonl_rows(path: Path) -> list[tuple[str, object]]:
    rows = []
    for lineno, line in enumerate(_text(path.read_bytes(), path).split("\n"), 1):
        if line.strip():
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise SqltuneError(f"malformed JSON in {path} at line {lineno}: {exc.msg} (one JSON object per "
                                   "line; a .json file may hold one list)") from None
    return rows


def _csv_rows(path: Path) -> list[tuple[str, object]]:
    reader = csv.reader(io.StringIO(_text(path.read_bytes(), path), newline=""), strict=True)
    rows, header = [], None
    try:
        for fields in reader:
            start = reader.line_num - sum(f.count("\n") for f in fields)  # where a quoted multi-line row began
            if header is None:
                header = [name.strip() for name in fields]
                missing = [k for k in KEYS if k not in header]
                if missing:
                    raise SqltuneError(f"{path} has no {missing[0]!r} column (its header: "
                                       f"{', '.join(header) or 'empty'}; needed: {', '.join(KEYS)})"[:300])
            elif any(f.strip() for f in fields):
                if len(fields) != len(header):
                    raise SqltuneError(f"{path} line {start} has {len(fields)} fields, the header has {len(header)}")
                rows.append((f"line {start}", dict(zip(header, fields))))
    except csv.Error as exc:
        raise SqltuneError(f"bad CSV in {path} at line {reader.line_num}: {exc}") from None
    if header is None:
        raise SqltuneError(f"{path} is empty (a CSV pairs file needs a header: {', '.join(KEYS)})")
    return rows


def read_pairs(name: str, option: str) -> list[Pair]:
    """The pairs of one file, each checked: an object with db_id, question and query as non-empty text, db_id a
    plain name (it becomes a file name)."""
    path = Path(name)
    if not path.is_file():
        raise SqltuneError(f"{option} file not found: {path}")
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    elif path.suffix.lower() == ".json":
        rows = [(f"example {i}", row) for i, row in enumerate(read_list(path, ()))]
    else:
        rows = _jsonl_rows(path)
    if not rows:
        raise SqltuneError(f"{path} holds no pairs")
    pairs = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise SqltuneError(f"{path}: {where} is not a JSON object with {', '.join(KEYS)}")
        for key in KEYS:
            if not text_field(row, key, path, where).strip():
                raise SqltuneError(f"{path}: {where} has an empty {key!r}")
        db_id = row["db_id"]
        if db_id != db_id.strip() or db_id in (".", "..") or any(c in db_id for c in "/\\\0"):
            raise SqltuneError(f"{path}: {where} db_id {db_id!r} is not a database name (no /, \\, spaces around "
                               "it, . or ..)"[:300])
        pairs.append((f"{path.name} {where}", Example(db_id=db_id, question=row["question"], query=row["query"])))
    return pairs


def locate(root: Path, db_id: str) -> Path | None:
    """The database file of db_id: Spider's layout first, then flat."""
    for path in (root / db_id / f"{db_id}.sqlite", root / f"{db_id}.sqlite"):
        if path.is_file():
            return path
    return None


def _databases(root: Path, db_ids: set[str]) -> tuple[dict[str, Path], dict[str, dict], dict[str, str]]:
    """(db_id -> file, db_id -> tables.json entry) of the usable databases, and db_id -> why for the others."""
    paths, entries, why = {}, {}, {}
    for db_id in sorted(db_ids):
        path = locate(root, db_id)
        problem = f"no {db_id}.sqlite in --db_dir" if path is None else database_problem(path)
        entry = None
        if problem is None:
            entry, problem = readable_entry(path, db_id)
        if entry is None:
            why[db_id] = problem
        else:
            paths[db_id], entries[db_id] = path, entry
    return paths, entries, why


def _failing(pairs: list[Pair], paths: dict[str, Path]) -> dict[int, str]:
    """Index -> the error, for each pair whose query fails on its database (run as the evaluator runs gold)."""
    items = [(str(paths[ex.db_id]), ex.query) for _, ex in pairs]
    if not items:
        return {}
    limits = Limits(timeout=SQL_TIMEOUT, max_rows=SQL_MAX_ROWS)
    with Sandbox(default_workers(0, len(set(paths.values()))), limits) as sandbox:
        counts = sandbox.map(count_rows, items, key=lambda item: item[0],
                             on_fail=lambda item, reason, phase, step: str(reason or "failed"))
    return {i: " ".join(c.split())[:120] for i, c in enumerate(counts) if isinstance(c, str)}


def _draw_dev(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, dev): round(fraction * n) pairs (at least one, never all) drawn with `seed`; file order kept."""
    if len(pairs) < 2:
        raise SqltuneError(f"--dev_fraction needs at least 2 usable pairs, there are {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    dev = set(order[:min(len(pairs) - 1, max(1, round(fraction * len(pairs))))])
    return [p for i, p in enumerate(pairs) if i not in dev], [p for i, p in enumerate(pairs) if i in dev]


def load_config(cfg, splits: list[str]) -> SourceData:
    """The train and dev splits of `cfg.pairs` (and `cfg.dev_pairs`) over the databases in `cfg.db_dir`."""
    if not cfg.db_dir:
        raise SqltuneError("--source sqlite needs --db_dir (the folder of your databases)")
    root = require_dir(cfg.db_dir)
    if not cfg.pairs:
        raise SqltuneError("--source sqlite needs --pairs (a JSONL or CSV file with db_id, question, query)")
    other = [s for s in splits if s not in ("train", "dev")]
    if other:
        raise SqltuneError(f"--source sqlite makes the splits train and dev, not {other[0]}")
    if cfg.dev_pairs and "dev" in splits:
        sources = {"train": read_pairs(cfg.pairs, "--pairs")} if "train" in splits else {}
        sources["dev"] = read_pairs(cfg.dev_pairs, "--dev_pairs")
    elif cfg.dev_fraction or len(splits) == 1:
        sources = {"train" if cfg.dev_fraction else splits[0]: read_pairs(cfg.pairs, "--pairs")}  # drawn below
    else:
        raise SqltuneError("--source sqlite: give --dev_pairs FILE or --dev_fraction F for the dev split "
                           "(or --splits train)")
    every = [pair for pairs in sources.values() for pair in pairs]
    paths, entries, why = _databases(root, {ex.db_id for _, ex in every})
    left_out: dict[str, list[str]] = {k: [] for k in LEFT_OUT}
    left_out["missing_database"] = [f"{where} ({ex.db_id}: {why[ex.db_id]})" for where, ex in every
                                    if ex.db_id in why]
    runnable = [pair for pair in every if pair[1].db_id in paths]
    failing = _failing(runnable, paths)
    left_out["failing_sql"] = [f"{runnable[i][0]} ({runnable[i][1].db_id}: {error})" for i, error in failing.items()]
    bad = {id(runnable[i]) for i in failing} | {id(pair) for pair in every if pair[1].db_id in why}
    kept = {split: [pair for pair in pairs if id(pair) not in bad] for split, pairs in sources.items()}
    if cfg.dev_fraction and "dev" not in kept:
        kept["train"], kept["dev"] = _draw_dev(kept["train"], cfg.dev_fraction, cfg.seed)
    for split in splits:
        if not kept[split]:
            named = (left_out["missing_database"] + left_out["failing_sql"])[:1]
            raise SqltuneError((f"the {split} split has no usable pair left: every one's database is missing "
                                f"(looked for {root}/<db_id>/<db_id>.sqlite and {root}/<db_id>.sqlite) or its SQL "
                                "fails" + (f"; first: {named[0]}" if named else ""))[:400])
    used = sorted({ex.db_id for split in splits for _, ex in kept[split]})
    tables_name = f"{cfg.name}_tables.json"
    tables_file = Path(cfg.out) / tables_name
    tables = {db_id: entries[db_id] for db_id in used}
    if all(paths[d] == root / d / f"{d}.sqlite" for d in used):
        db_dir, databases = root, {}
    else:
        db_dir, databases = Path(cfg.out) / f"{cfg.name}_databases", {d: paths[d] for d in used}
    out = {split: Split([ex for _, ex in kept[split]], tables, tables_file, db_dir, databases) for split in splits}
    text = json.dumps([tables[d] for d in used], indent=2, ensure_ascii=False) + "\n"
    return SourceData(out, files={tables_name: text}, left_out=left_out)
