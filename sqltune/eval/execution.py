"""Execution accuracy (the official exec_eval.eval_exec_match), run safely.

Rules:
- `> =`, `< =`, `! =` are closed up; `YEAR(CURDATE())` becomes 2020; DISTINCT is removed from both queries
  unless keep_distinct (token-wise, with sqlparse);
- results are bags of rows; row order matters only when the gold query has ORDER BY; columns may come in any
  order (a column permutation that makes the bags equal is searched for);
- every SQLite database file in the database's folder must agree (test-suite accuracy); with one file, that is
  Spider EX. Files are picked by content (the SQLite header), not by name: a `-wal`, `-journal` or notes file
  beside a database is never taken for one;
- with plug_value, the prediction also passes if any filling of its values with gold values passes (at most
  PLUG_MAX fillings, tried within one timeout).

Unlike the official script, a gold query that fails is reported (not a crash), and every query runs in the
sandbox (sqltune.sandbox): read-only, bounded in time, rows, bytes and memory. A question stops at its first
query that times out. Gold results are cached per worker (per file and query), within a byte budget.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from pathlib import Path

from sqltune.eval.databases import database_files
from sqltune.eval.values import plugged_candidates
from sqltune.sandbox import QueryError, limits, query, result_size
from sqltune.sqltext import first_statement_tokens

_CUR_YEAR = re.compile(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", re.IGNORECASE)

PLUG_MAX = 256  # fillings tried with --plug_value (a prediction with 40 literals has 2^80)
_GOLD_CACHE_BYTES = 128 << 20


def close_operators(query: str) -> str:
    return query.replace("> =", ">=").replace("< =", "<=").replace("! =", "!=")


def remove_distinct(query: str) -> str:
    """The first statement's sqlparse tokens, DISTINCT left out (the official joins them back with no spaces)."""
    if query.strip() and "distinct" not in query.lower() and ";" not in query and "GO" not in query:
        return query  # one statement, nothing to drop: sqlparse's tokens join back to the same text
    tokens = first_statement_tokens(query)
    if tokens is None:
        return query
    return "".join(value for _, value in tokens if value.lower() != "distinct")


def spider_form(pred: str, keep_distinct: bool) -> str:
    """A prediction as Spider's EX runs it: the `value` placeholder becomes 1 (the official rule, applied to the
    whole text), operators closed up, DISTINCT dropped unless keep_distinct, YEAR(CURDATE()) as 2020."""
    pred = close_operators(pred.replace("value", "1"))
    return pred if keep_distinct else remove_distinct(pred)


def gold_form(gold: str, keep_distinct: bool) -> str:
    gold = close_operators(gold)
    return gold if keep_distinct else remove_distinct(gold)


def run(path: Path, sql: str, phase: str) -> list[tuple]:
    """Rows of one query in the sandbox, `YEAR(CURDATE())` read as 2020 (the official rule)."""
    return query(path, _CUR_YEAR.sub("2020", sql), phase)


def _unordered_row(row: tuple) -> tuple:
    return tuple(sorted(row, key=lambda x: str(x) + str(type(x))))


def _bags_may_match(r1: list, r2: list, order_matters: bool) -> bool:
    s1 = [_unordered_row(r) for r in r1]
    s2 = [_unordered_row(r) for r in r2]
    return s1 == s2 if order_matters else set(s1) == set(s2)


def _candidate_permutations(r1: list, r2: list, n_cols: int, order_matters: bool):
    """The column permutations under which r2's rows equal r1's (perm[i]: the column of r2 read as r1's column i),
    the identity first.

    Only one-to-one mappings, built column by column, and only while the columns mapped so far already agree: their
    projections are the same list of rows (the same bag when order does not matter); a mapping of every column that
    agrees is a permutation making the whole rows equal. Any such permutation passes every earlier check, so the
    search finds one whenever one exists; it only skips the mappings that cannot work, and of several columns of r2
    holding the same values it tries one. The official tries every
    product of columns (after a check on 20 sampled rows), which grows about 17-fold per added column when columns
    share values (0/1 flags, NULLs; 0.09 s at 8 columns here), and results are compared for every question and, in
    a vote, for every pair of candidates.
    """
    perm: list[int] = []

    def agree() -> bool:
        left = [tuple(row[c] for c in range(len(perm))) for row in r1]
        right = [tuple(row[c] for c in perm) for row in r2]
        return left == right if order_matters else Counter(left) == Counter(right)

    def extend(i: int):
        if i == n_cols:
            yield tuple(perm)
            return
        tried = set()  # two columns of r2 holding the same values lead to the same mappings: one is enough
        for j in [i] + [j for j in range(n_cols) if j != i]:
            if j not in perm and (column := tuple(row[j] for row in r2)) not in tried:
                tried.add(column)
                perm.append(j)
                if agree():
                    yield from extend(i + 1)
                perm.pop()

    return extend(0)


def results_equal(gold: list[tuple], pred: list[tuple], order_matters: bool) -> bool:
    """Same bag (or list, if order matters) of rows up to a permutation of columns."""
    if not gold and not pred:
        return True
    if len(gold) != len(pred):
        return False
    n_cols = len(gold[0])
    if len(pred[0]) != n_cols:
        return False
    if not _bags_may_match(gold, pred, order_matters):
        return False
    return next(_candidate_permutations(gold, pred, n_cols, order_matters), None) is not None


# ------------------------------------------------------------------------------------------ gold results
_GOLD: dict[tuple[Path, str], object] = {}
_gold_bytes = 0


def gold_result(path: Path, sql: str, cache: bool = True):
    """Rows of a gold query, or its QueryError; cached per (file, query) in this worker while the cache holds
    fewer than _GOLD_CACHE_BYTES (beyond, results are not kept: the worker's memory is bounded)."""
    global _gold_bytes
    key = (path, sql)
    if key in _GOLD:
        return _GOLD[key]
    try:
        rows = run(path, sql, "gold query")
    except QueryError as exc:
        rows = exc
    size = 0 if isinstance(rows, QueryError) else result_size(rows)
    if cache and _gold_bytes + size <= _GOLD_CACHE_BYTES:
        _GOLD[key] = rows
        _gold_bytes += size
    return rows


_FILES: dict[Path, list[Path]] = {}


def _files(db_path: Path) -> list[Path]:
    """database_files, listed once per folder in this worker."""
    if db_path not in _FILES:
        _FILES[db_path] = database_files(db_path)
    return _FILES[db_path]


def exec_match(db_path: Path, pred: str, gold: str, plug_value: bool, keep_distinct: bool, cache: bool = True
               ) -> tuple[int, str | None, str | None]:
    """(1 or 0, prediction error, gold error); `pred` in spider_form already (EM reads the same text)."""
    gold = gold_form(gold, keep_distinct)
    order_matters = "order by" in gold.lower()
    files = _files(db_path)
    if not files:
        return 0, f"no SQLite database file beside {db_path}", None
    candidates = [pred]
    if plug_value:
        try:
            candidates = itertools.chain([pred], itertools.islice(plugged_candidates(gold, pred), PLUG_MAX))
        except Exception:  # noqa: BLE001 - an unparseable prediction just has no plugged variants
            candidates = [pred]
    stop = time.monotonic() + limits().timeout  # the fillings share one timeout
    first_error = None
    for k, candidate in enumerate(candidates):
        if k and time.monotonic() > stop:
            break
        passes = True
        for path in files:
            gold_rows = gold_result(path, gold, cache)
            if isinstance(gold_rows, QueryError):
                return 0, None, f"gold query failed on {path.name}: {gold_rows}"
            try:
                pred_rows = run(path, candidate, "predicted query")
            except QueryError as exc:
                first_error = first_error or str(exc)
                if str(exc).startswith("timed out"):
                    return 0, first_error, None  # a question stops at its first timeout
                passes = False
                break
            if not results_equal(gold_rows, pred_rows, order_matters):
                passes = False
                break
        if passes:
            return 1, None, None
    return 0, first_error, None
