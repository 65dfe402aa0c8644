"""Hardness (easy / medium / hard / extra) by the official component counts (evaluation.Evaluator.eval_hardness).

- component 1: WHERE, GROUP BY, ORDER BY, LIMIT, each extra joined table, each OR, each LIKE;
- component 2: nested queries (in FROM/WHERE/HAVING conditions) and INTERSECT / UNION / EXCEPT;
- others: more than one aggregate, more than one selected column, more than one WHERE condition, more than one
  GROUP BY column. The official counts aggregates with its own quirks (a WHERE condition's NOT flag, and each
  AND/OR of HAVING, count as aggregates); they are kept so that the counts per level agree.
"""

from __future__ import annotations

from sqltune.eval.parse import WHERE_OPS


def nested_queries(sql: dict) -> list[dict]:
    nested = []
    for cond in sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]:
        for val in (cond[3], cond[4]):
            if isinstance(val, dict):
                nested.append(val)
    nested.extend(sql[op] for op in ("intersect", "except", "union") if sql[op] is not None)
    return nested


def _has_agg(unit) -> bool:
    return unit[0] != 0


def _count_agg(units) -> int:
    return sum(1 for unit in units if _has_agg(unit))


def count_component1(sql: dict) -> int:
    count = sum(1 for part in (sql["where"], sql["groupBy"], sql["orderBy"]) if len(part) > 0)
    count += sql["limit"] is not None
    if sql["from"]["table_units"]:
        count += len(sql["from"]["table_units"]) - 1
    connectors = sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]
    count += connectors.count("or")
    units = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    count += sum(1 for unit in units if unit[1] == WHERE_OPS.index("like"))
    return count


def count_component2(sql: dict) -> int:
    return len(nested_queries(sql))


def count_others(sql: dict) -> int:
    aggs = _count_agg(sql["select"][1]) + _count_agg(sql["where"][::2]) + _count_agg(sql["groupBy"])
    if sql["orderBy"]:
        units = sql["orderBy"][1]
        aggs += _count_agg([u[1] for u in units if u[1]] + [u[2] for u in units if u[2]])
    aggs += _count_agg(sql["having"])  # the official passes the whole condition list, connectors included
    count = int(aggs > 1)
    count += len(sql["select"][1]) > 1
    count += len(sql["where"]) > 1
    count += len(sql["groupBy"]) > 1
    return count


def hardness(sql: dict) -> str:
    c1, c2, others = count_component1(sql), count_component2(sql), count_others(sql)
    if c1 <= 1 and others == 0 and c2 == 0:
        return "easy"
    if (others <= 2 and c1 <= 1 and c2 == 0) or (c1 <= 2 and others < 2 and c2 == 0):
        return "medium"
    if (others > 2 and c1 <= 2 and c2 == 0) or (2 < c1 <= 3 and others <= 2 and c2 == 0) \
            or (c1 <= 1 and others == 0 and c2 <= 1):
        return "hard"
    return "extra"
