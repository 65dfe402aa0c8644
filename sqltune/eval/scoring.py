"""One question's score, computed inside a sandbox worker: hardness, EX and EM for Spider, EX for BIRD.

Errors are recorded in the result, never raised. Every question is counted in EX: a gold query the exact-match
parser cannot read (CAST, `||`, much of BIRD) is still executed and scored; its EM is left unscored (None) and
counted as such, and its hardness is "unknown". A prediction longer than MAX_SQL_BYTES is wrong with that reason
and never parsed or run. The worker's state (settings, schemas, foreign-key maps, unreadable databases) is set
once per worker by `init_worker`.
"""

from __future__ import annotations

from pathlib import Path

from sqltune.config import EvalConfig
from sqltune.errors import SqltuneError
from sqltune.eval.exact_match import exact_match, normalise
from sqltune.eval.execution import exec_match, gold_result, run, spider_form
from sqltune.eval.files import Pair
from sqltune.eval.hardness import hardness
from sqltune.eval.parse import Schema, empty_sql, parse_sql
from sqltune.sandbox import QueryError, set_step, too_long
from sqltune.io import database_path

UNKNOWN = "unknown"  # the hardness of a question whose gold the parser cannot read (scored in EX only)
HARDNESS = ("easy", "medium", "hard", "extra", UNKNOWN)  # published to the parent as the worker's step (1-based)
_STATE: dict = {}


def init_worker(cfg: EvalConfig, kmaps: dict, tables: dict, unreadable: dict, cache: bool = True) -> None:
    _STATE.clear()
    _STATE.update(cfg=cfg, kmaps=kmaps, tables=tables, unreadable=unreadable, schemas={}, cache=cache)


def _schema(db_id: str, db_path: Path) -> Schema:
    schemas = _STATE["schemas"]
    if db_id not in schemas:
        if db_path.is_file() and db_id not in _STATE["unreadable"]:
            schemas[db_id] = Schema.from_sqlite(db_path)
        elif db_id in _STATE["tables"]:
            schemas[db_id] = Schema.from_tables_entry(_STATE["tables"][db_id])
        else:
            raise SqltuneError(f"database {db_id!r}: no usable file {db_path} and no entry in the tables file")
    return schemas[db_id]


def blank_result(pair: Pair) -> dict:
    return {"index": pair.index, "interaction": pair.interaction, "turn": pair.turn, "db_id": pair.db_id,
            "question": pair.question, "gold": pair.gold, "pred": pair.pred, "hardness": None, "ex": None,
            "em": None, "error": None, "gold_error": None, "gold_unparsed": None, "partial": None,
            "difficulty": pair.difficulty}


def failed_result(cfg: EvalConfig, pair: Pair, reason: str, phase: str, step: int) -> dict:
    """The result of a question whose worker was killed (past its deadline) or died: wrong in EX and EM, under the
    hardness the worker had published (`step`); a gold query that never ended is reported as the gold's failure."""
    out = blank_result(pair)
    if cfg.bird:
        out["hardness"] = out["difficulty"] or "all"
    else:
        out["hardness"] = HARDNESS[step - 1] if 0 < step <= len(HARDNESS) else UNKNOWN
        out["em"] = 0 if cfg.etype != "exec" and out["hardness"] != UNKNOWN else None
    out["ex"] = 0 if cfg.etype != "match" else None
    if phase == "gold query":
        out["gold_error"] = f"gold query failed: {reason}"
    else:
        out["error"] = reason
    return out


def score_pair(pair: Pair) -> dict:
    """Hardness, EX and EM of one prediction."""
    cfg: EvalConfig = _STATE["cfg"]
    db_path = database_path(cfg.db_dir, pair.db_id)
    unreadable = _STATE["unreadable"].get(pair.db_id)
    out = blank_result(pair)
    if cfg.bird:
        return _score_bird(out, pair.pred, db_path, unreadable)
    pred = pair.pred.replace("value", "1")  # the official Spider script's rule: a `value` placeholder becomes 1
    schema, gold_tree = None, None
    try:
        schema = _schema(pair.db_id, db_path)
        gold_tree = parse_sql(pair.gold, schema)
        out["hardness"] = hardness(gold_tree)
    except Exception as exc:  # noqa: BLE001 - reported per question, scored in EX all the same
        out["hardness"] = UNKNOWN
        out["gold_unparsed"] = f"gold query does not parse (scored in EX only): {exc}"
    set_step(HARDNESS.index(out["hardness"]) + 1)
    long = too_long(pair.pred)
    if cfg.etype in ("all", "exec"):
        if unreadable:
            out["ex"], out["error"] = 0, f"database unreadable: {unreadable}"
        elif long:
            out["ex"], out["error"] = 0, long
        elif db_path.is_file():
            ex, error, gold_error = exec_match(db_path, spider_form(pair.pred, cfg.keep_distinct), pair.gold,
                                               cfg.plug_value, cfg.keep_distinct, _STATE["cache"])
            out["ex"], out["error"] = ex, error
            out["gold_error"] = gold_error
        else:
            out["ex"], out["error"] = 0, f"database file not found: {db_path}"
    if cfg.etype in ("all", "match") and gold_tree is not None:
        kmap = _STATE["kmaps"].get(pair.db_id, {})
        out["em"], out["partial"], parse_error = _exact(pred, long, schema, gold_tree, kmap)
        if parse_error and not out["error"]:
            out["error"] = parse_error
    if not pred.strip():
        out["error"] = "empty prediction"
    return out


def _exact(pred: str, long: str | None, schema: Schema, gold_tree: dict, kmap: dict
           ) -> tuple[int, dict | None, str | None]:
    """(EM, partial scores, parse error): the official scores an unparseable prediction as the empty query."""
    parse_error = None
    if long:
        pred_tree, parse_error = empty_sql(), long
    else:
        try:
            pred_tree = parse_sql(pred, schema)
        except Exception as exc:  # noqa: BLE001
            pred_tree, parse_error = empty_sql(), f"does not parse: {exc}"
    try:
        em, partial = exact_match(normalise(pred_tree, schema, kmap), normalise(gold_tree, schema, kmap))
    except RecursionError:  # the parser's nesting bound makes this unreachable; kept as a last guard
        return 0, None, "does not parse: nested too deeply"
    return int(em), partial, parse_error


def _score_bird(out: dict, pred: str, db_path: Path, unreadable: str | None) -> dict:
    """BIRD EX as the official BIRD evaluator: set(predicted rows) == set(gold rows); a timeout or an error counts
    wrong, a failing gold query too (it is also reported). No `value` placeholder rule (that is Spider's)."""
    out["hardness"] = out["difficulty"] or "all"
    if unreadable:
        out["ex"], out["error"] = 0, f"database unreadable: {unreadable}"
        return out
    gold_rows = gold_result(db_path, out["gold"], _STATE["cache"])
    if isinstance(gold_rows, QueryError):
        out["ex"], out["gold_error"] = 0, f"gold query failed on {db_path.name}: {gold_rows}"
        return out
    try:
        out["ex"] = int(set(run(db_path, pred, "predicted query")) == set(gold_rows))
    except QueryError as exc:
        out["ex"], out["error"] = 0, str(exc)
    if not pred.strip():
        out["error"] = "empty prediction"
    return out


def score_chunk(pairs: list[Pair]) -> list[dict]:
    return [score_pair(p) for p in pairs]
