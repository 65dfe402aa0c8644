"""`sqltune ask`: a question about a SQLite file, answered by a trained model, its SQL run in the sandbox and the
result shown; without a question, a loop over the questions on stdin with the model loaded once.

The prompt is the one training saw: the schema read from the file itself (sqltune.data.sqlite_tables), stated in
the schema style of the data the model was trained on (sqltune.data.schema; the style from the training record,
sqltune.infer.prompt_format), worded by sqltune.data.prompts and encoded in the trained template and length
(sqltune.templates). The SQL runs only in the sandbox (sqltune.sandbox): read-only, in a worker process killed past
its deadline, and a result is cut at --max_rows rather than read whole. `--vote execution` samples candidates and
answers with one of the largest group of equal results (sqltune.infer.vote).

Every input is checked before the model is loaded (the database, the model, the adapter, the training record), so
a mistake is one line. Backend: transformers (sqltune.infer.hf_backend), or with --endpoint an OpenAI-compatible
server such as `sqltune serve` (sqltune.infer.endpoint), sent the same prompt token ids; the model folder then gives
only the tokenizer and the training record.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Iterable, TextIO

from sqltune.config import AskConfig, predict_settings
from sqltune.errors import SqltuneError
from sqltune.infer.extract import extract_sql
from sqltune.infer.prompt_format import prompt_settings, trained_schema_style, training_record

DEFAULT_STYLE = "words"  # prepare's default: what a model trained on data prepared without --schema_style saw
CELL_CHARS = 60  # a table cell is cut here (json keeps the whole value)


# ------------------------------------------------------------------------------------------- the schema
def database_schema(db: Path, style: str, sample_rows: int) -> list[str]:
    """The schema blocks of a SQLite file in `style`, read from the file (one line when it cannot be used)."""
    from sqltune.data.schema import render_schema
    from sqltune.data.sqlite_tables import readable_entry
    from sqltune.sandbox import database_problem

    if not db.is_file():
        raise SqltuneError(f"--db {db}: " + ("is a folder, not a SQLite file" if db.is_dir() else "file not found"))
    if (why := database_problem(db)) is not None:
        raise SqltuneError(f"--db {db}: {why}")
    entry, why = readable_entry(db, db.stem)
    if entry is None:
        raise SqltuneError(f"--db {db}: {why}")
    if not entry["table_names_original"]:
        raise SqltuneError(f"--db {db} has no tables to ask about")

    def unusable(path: Path, reason: str) -> None:
        raise SqltuneError(f"--db {path}: {reason}")

    return render_schema(entry, style, db, sample_rows, warn=unusable)


# ------------------------------------------------------------------------------------------- answering
class Asker:
    """Everything loaded once: the prompt settings, the schema, the model and one sandbox worker. Use as a context
    manager (the worker is closed at the end)."""

    def __init__(self, cfg: AskConfig):
        from sqltune.loading import check_adapter, check_attention, load_tokenizer, resolve
        from sqltune.templates import get_template

        if not cfg.model_name_or_path:
            raise SqltuneError("--model_name_or_path is required (a model folder or a catalog name)")
        if not cfg.db:
            raise SqltuneError("--db is required (the SQLite file to ask about)")
        self.cfg, self.db = cfg, Path(cfg.db)
        model = resolve(cfg.model_name_or_path)
        adapter = check_adapter(cfg.adapter) if cfg.adapter else None
        trained, where = training_record(model, adapter)
        template_name, length = prompt_settings(cfg, trained, where, who="ask")
        style = cfg.schema_style or trained_schema_style(trained) or DEFAULT_STYLE
        self.schema = database_schema(self.db, style, cfg.sample_rows)
        if not cfg.endpoint:
            check_attention(cfg.attn_implementation)
        self.model = model
        self.tokenizer = load_tokenizer(model)
        self.template = get_template(template_name, self.tokenizer)
        self.end = self.template.end_marker(self.tokenizer)
        self.length = length
        self.settings = predict_settings(cfg)
        self.generator = None
        self.executor = None

    def __enter__(self) -> "Asker":
        from sqltune.infer.hf_backend import HFGenerator
        from sqltune.infer.vote import make_executor

        if self.cfg.endpoint:
            from sqltune.infer.endpoint import EndpointGenerator
            from sqltune.io import read_json
            from sqltune.templates import stop_token_ids

            config = self.model / "generation_config.json"
            stop = stop_token_ids(self.tokenizer, self.template, read_json(config) if config.is_file() else None)
            self.generator = EndpointGenerator(self.settings, self.cfg.endpoint, self.cfg.served_model, stop,
                                               self.end, self.cfg.request_timeout)
        else:
            self.generator = HFGenerator(self.settings, self.tokenizer, self.template)
        self.executor = make_executor(timeout=self.cfg.timeout)
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.close()

    def prompt(self, question: str) -> tuple[list[int], bool]:
        """Token ids of the question's prompt, worded as prepare words a record, and whether it was cut."""
        from sqltune.data.prompts import make_record
        from sqltune.templates import encode_prompt

        record = make_record(self.db.stem, self.schema, question, "")
        return encode_prompt(self.tokenizer, self.template, record, self.length)

    def sql(self, question: str) -> str:
        """The model's SQL: greedy, or the winner of an execution vote."""
        ids, _ = self.prompt(question)
        if self.cfg.vote == "execution":
            from sqltune.infer.vote import vote

            (cands,) = self.generator.candidates([ids], self.cfg.num_samples, True, self.end)
            sql, _ = vote(cands, self.db, self.executor, prefer_rows=self.cfg.prefer_rows)
            return sql
        ((text, _),) = self.generator.generate([ids])
        return extract_sql(text, self.end)

    def answer(self, question: str) -> tuple[dict, bool]:
        """({"sql", "columns", "rows", "error"}, whether more rows followed): the SQL and the first --max_rows rows
        of its result, or why there is none."""
        return run_sql(self.sql(question), self.db, self.executor, self.cfg.max_rows)


def run_sql(sql: str, db: Path, executor, max_rows: int) -> tuple[dict, bool]:
    """The answer object of one SQL, run in the sandbox (read-only, bounded) and cut at max_rows rows, and whether
    the result had more."""
    from sqltune.sandbox import QueryError, shown_rows

    if not sql.strip():
        return {"sql": sql, "columns": [], "rows": [], "error": "the model wrote no SQL"}, False
    try:
        columns, rows, more = executor.call(shown_rows, db, sql, max_rows)
    except QueryError as exc:
        return {"sql": sql, "columns": [], "rows": [], "error": str(exc)}, False
    return {"sql": sql, "columns": list(columns), "rows": [list(row) for row in rows], "error": None}, more


# ------------------------------------------------------------------------------------------- showing
def _json_value(value):
    """A cell as JSON can hold it: bytes as their length, non-finite floats as text."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def as_json(answer: dict) -> str:
    return json.dumps({**answer, "rows": [[_json_value(v) for v in row] for row in answer["rows"]]},
                      ensure_ascii=False)


def _cell(value) -> str:
    text = "NULL" if value is None else str(_json_value(value))
    text = " ".join(text.split())  # one line per row, whatever the value holds
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…"


def as_table(answer: dict, more: bool) -> str:
    """The SQL, then the result as an aligned table with a row count (or the error)."""
    lines = [f"SQL: {answer['sql'] or '(none)'}"]
    if answer["error"]:
        return "\n".join(lines + [f"error: {answer['error']}"])
    header = [_cell(c) for c in answer["columns"]]
    body = [[_cell(v) for v in row] for row in answer["rows"]]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines.append(" | ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in body]
    n = len(body)
    lines.append(f"(the first {n} rows; more follow)" if more else f"({n} row{'' if n == 1 else 's'})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the command
def ask(cfg: AskConfig, questions: Iterable[str] | None = None, out: TextIO | None = None) -> dict:
    """Answer cfg.question, or else each non-blank line of `questions` (stdin by default) until its end; print each
    answer as a table or one JSON object per line. Returns the counts."""
    out = out or sys.stdout
    if cfg.question:
        lines: Iterable[str] = [cfg.question]
    else:
        lines = sys.stdin if questions is None else questions
    interactive = questions is None and not cfg.question and sys.stdin.isatty()
    asked = failed = 0
    with Asker(cfg) as asker:
        if interactive:
            print(f"ask: {asker.db}; one question per line, Ctrl-D to end", file=sys.stderr)
        for line in lines:
            question = line.strip()
            if not question:
                continue
            answer, more = asker.answer(question)
            asked += 1
            failed += answer["error"] is not None
            print(as_json(answer) if cfg.format == "json" else as_table(answer, more) + "\n", file=out, flush=True)
    return {"questions": asked, "errors": failed}
