"""Which candidate queries EX would score alike: the vote's grouping, run in the sandbox beside EX's own rules.

Two candidates are one answer when, for any gold query, EX gives them the same score:
- Spider (and test-suite folders): each candidate is run as EX runs a prediction (`spider_form`: `value` -> 1,
  operators closed up, DISTINCT dropped unless keep_distinct) on every SQLite file of the database's folder; two
  results are equal under results_equal on every file (any column order; row order as `ordered` says, one flag
  for the whole question, guessed from the candidates that ran, as EX takes it from the gold). A candidate that
  fails on any file fails (EX would score it wrong);
- BIRD: the candidate as written, on the database file alone; results equal as sets of rows (BIRD's rule).

Only one result per group is kept, and those kept are bounded in total (twice the per-result bound): a candidate
whose new group would pass that fails with the reason named. Candidates a parent had to kill (past their
deadline) come in `failed` and are not run again.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from sqltune.eval.databases import database_files
from sqltune.eval.execution import results_equal, run, spider_form
from sqltune.sandbox import MB, QueryError, limits, result_size, set_step


def _canonical(value):
    """1 and 1.0 are equal to EX (Python ==), so a whole float is written as an int in the signature."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def signature(rows: list[tuple], ordered: bool) -> str:
    """A short hash of a result that ignores column order (and row order unless `ordered`): equal results under
    results_equal always get the same signature (the converse is checked with results_equal itself)."""
    canon = [sorted(repr(_canonical(v)) for v in row) for row in rows]
    if not ordered:
        canon.sort()
    return hashlib.sha1(repr((ordered, canon)).encode()).hexdigest()[:12]


def bird_signature(rows: list[tuple]) -> str:
    """A short hash of a result as a set of rows, column order kept (BIRD's comparison)."""
    canon = sorted({repr(tuple(_canonical(v) for v in row)) for row in rows})
    return hashlib.sha1(repr(canon).encode()).hexdigest()[:12]


def ordered_sql(sql: str) -> bool:
    return "order by" in sql.lower()  # the evaluator's own test for "row order matters"


def _run_everywhere(db_path: Path, sql: str, bird: bool, keep_distinct: bool) -> list[list[tuple]]:
    """Rows per file, as EX would run this candidate."""
    if not sql.strip():
        raise QueryError("empty query")
    if bird:
        return [run(db_path, sql, "query")]
    files = database_files(db_path)
    if not files:
        raise QueryError(f"no SQLite database file beside {db_path}")
    form = spider_form(sql, keep_distinct)
    return [run(path, form, "query") for path in files]


def same_answers(db_path: str | Path, sqls: list[str], bird: bool = False, keep_distinct: bool = False,
                 failed: dict[int, str] | None = None) -> dict:
    """{"ordered": bool, "results": per candidate {"error"} or {"group", "rows", "cols", "signature"}}; each
    distinct SQL runs once, candidate i's step is i (what the parent reports when it kills the worker)."""
    db_path, failed = Path(db_path), failed or {}
    outcome: dict[str, list | str] = {}  # sql -> rows per file, or the error
    for i, sql in enumerate(sqls):
        set_step(i)
        if sql in outcome:
            continue
        if i in failed:
            outcome[sql] = failed[i]
            continue
        try:
            outcome[sql] = _run_everywhere(db_path, sql, bird, keep_distinct)
        except QueryError as exc:
            outcome[sql] = str(exc)
    ran = [sql for sql in sqls if not isinstance(outcome[sql], str)]
    ordered = not bird and 2 * sum(ordered_sql(sql) for sql in ran) >= len(ran) > 0
    groups: list[tuple[str, list]] = []  # (signature, rows per file) of each group's first member
    kept, bound = 0, 2 * limits().max_bytes
    results: list[dict] = []
    group_of: dict[str, int | str] = {}
    for sql in sqls:
        if sql not in group_of:
            group_of[sql] = _group(outcome[sql], groups, ordered, bird)
            if isinstance(group_of[sql], int) and group_of[sql] == len(groups) - 1:
                kept += sum(result_size(rows) for rows in groups[-1][1])
                if kept > bound:
                    groups.pop()
                    group_of[sql] = f"results of this vote over {bound / MB:g} MB in total"
        g = group_of[sql]
        if isinstance(g, str):
            results.append({"error": g})
        else:
            rows = outcome[sql][0]
            results.append({"group": g, "rows": len(rows), "cols": len(rows[0]) if rows else 0,
                            "signature": groups[g][0]})
    return {"ordered": ordered, "results": results}


def _group(outcome, groups: list[tuple[str, list]], ordered: bool, bird: bool) -> int | str:
    """The index of the group this outcome joins (a new one at the end if none), or its error."""
    if isinstance(outcome, str):
        return outcome
    if bird:
        key = bird_signature(outcome[0])
        same = lambda other: set(other[0]) == set(outcome[0])  # noqa: E731
    else:
        key = "/".join(signature(rows, ordered) for rows in outcome)
        same = lambda other: all(results_equal(a, b, ordered) for a, b in zip(other, outcome))  # noqa: E731
    for g, (sig, rows) in enumerate(groups):
        if sig == key and same(rows):
            return g
    groups.append((key, outcome))
    return len(groups) - 1
