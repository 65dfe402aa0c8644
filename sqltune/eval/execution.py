"""Execution accuracy (the official exec_eval.eval_exec_match), run safely.

Rules:
- `> =`, `< =`, `! =` are closed up; `YEAR(CURDATE())` becomes 2020; DISTINCT is removed from both queries
  unless keep_distinct (token-wise, with sqlparse);
- results are bags of rows; row order matters only when the gold query has ORDER BY; columns may come in any
  order (a column permutation that makes the bags equal is searched for);
- every SQLite database file in the database's folder must agree (test-suite accuracy); with one file, that is
  Spider EX. Files are picked by content (the SQLite header), not by name: a `-wal`, `-journal` or notes file
  beside a database is never taken for one;
- with plug_value, the prediction also passes if any filling of its values with gold values passes.

Unlike the official script, a gold query that fails is reported (not a crash), and every query is bounded.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import Counter
from pathlib import Path

from sqltune.eval.safe_sqlite import QueryError, connect, run_query
from sqltune.eval.values import first_statement_tokens, plugged_candidates

_CUR_YEAR = re.compile(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", re.IGNORECASE)


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


SQLITE_HEADER = b"SQLite format 3\x00"


def is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == SQLITE_HEADER
    except OSError:
        return False


def database_files(db_path: str | Path) -> list[Path]:
    """Every SQLite database file in the folder of `db_path` (test-suite accuracy uses them all)."""
    folder = Path(db_path).parent
    return sorted(p for p in (folder / name for name in os.listdir(folder)) if p.is_file() and is_sqlite_file(p))


class Executor:
    """Runs queries with a connection per database file and caches gold results per (file, query)."""

    def __init__(self, timeout: float, max_rows: int, max_bytes: int = 64 << 20):
        self.timeout = timeout
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._conns: dict[Path, object] = {}
        self._gold: dict[tuple[Path, str], object] = {}
        self._files: dict[Path, list[Path]] = {}

    def run(self, path: Path, sql: str) -> list[tuple]:
        conn = self._conns.get(path)
        if conn is None:
            conn = self._conns[path] = connect(path, self.max_bytes)
        return run_query(conn, _CUR_YEAR.sub("2020", sql), self.timeout, self.max_rows, self.max_bytes)

    def files(self, db_path: Path) -> list[Path]:
        """database_files, listed once per folder."""
        if db_path not in self._files:
            self._files[db_path] = database_files(db_path)
        return self._files[db_path]

    def gold_result(self, path: Path, sql: str):
        key = (path, sql)
        if key not in self._gold:
            try:
                self._gold[key] = self.run(path, sql)
            except QueryError as exc:
                self._gold[key] = exc
        return self._gold[key]

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def exec_match(self, db_path: Path, pred: str, gold: str, plug_value: bool, keep_distinct: bool
                   ) -> tuple[int, str | None, str | None]:
        """(1 or 0, prediction error, gold error)."""
        pred, gold = close_operators(pred), close_operators(gold)
        if not keep_distinct:
            pred, gold = remove_distinct(pred), remove_distinct(gold)
        order_matters = "order by" in gold.lower()
        files = self.files(db_path)
        if not files:
            return 0, f"no SQLite database file beside {db_path}", None
        candidates = [pred]
        if plug_value:
            try:
                candidates = itertools.chain([pred], plugged_candidates(gold, pred))
            except Exception:  # noqa: BLE001 - an unparseable prediction just has no plugged variants
                candidates = [pred]
        first_error = None
        for candidate in candidates:
            passes = True
            for path in files:
                gold_rows = self.gold_result(path, gold)
                if isinstance(gold_rows, QueryError):
                    return 0, None, f"gold query failed on {path.name}: {gold_rows}"
                try:
                    pred_rows = self.run(path, candidate)
                except QueryError as exc:
                    if first_error is None:
                        first_error = str(exc)
                    passes = False
                    break
                if not results_equal(gold_rows, pred_rows, order_matters):
                    passes = False
                    break
            if passes:
                return 1, None, None
        return 0, first_error, None
