"""Exact set match (the official evaluation.Evaluator.eval_exact_match) and its partial scores.

Before comparing, both trees are normalised as the official does: condition values are dropped (only nested
queries are kept), DISTINCT flags are dropped, and a column that takes part in a foreign key is replaced by the
smallest column of its key group (only for columns of tables in the query's FROM). A query matches when every
component's F1 is 1 and the FROM tables are the same multiset.

Partial components: select, select(no AGG), where, where(no OP), group(no Having), group, order, and/or, IUEN,
keywords. Each reports (acc, rec, f1) as 1/1/1 when the counts agree and all match, else 0/0/0, as the official.
"""

from __future__ import annotations

import copy

from sqltune.eval.parse import TABLE_UNIT, WHERE_OPS, Schema

PARTIAL_TYPES = ("select", "select(no AGG)", "where", "where(no OP)", "group(no Having)", "group", "order",
                 "and/or", "IUEN", "keywords")


# ------------------------------------------------------------------ foreign keys and normalisation
def foreign_key_map(entry: dict) -> dict[str, str]:
    """tables.json entry -> {column id: id of the smallest column index in its foreign-key group}."""
    tables = entry["table_names_original"]
    ids = [f"__{tables[t].lower()}.{c.lower()}__" if t >= 0 else "__all__" for t, c in entry["column_names_original"]]
    groups: list[set[int]] = []
    for a, b in entry["foreign_keys"]:
        group = next((g for g in groups if a in g or b in g), None)
        if group is None:
            group = set()
            groups.append(group)
        group.update((a, b))
    kmap = {}
    for group in groups:
        members = sorted(group)
        for idx in members:
            kmap[ids[idx]] = ids[members[0]]
    return kmap


def _valid_columns(table_units: list, schema: Schema) -> set[str]:
    prefixes = {unit[1][:-2] for unit in table_units if unit[0] == TABLE_UNIT}
    return {v for v in schema.ids.values() if "." in v and v[: v.index(".")] in prefixes}


def _col_unit(cu, valid, kmap):
    if cu is None:
        return None
    agg, col_id, _distinct = cu
    if col_id in kmap and col_id in valid:
        col_id = kmap[col_id]
    return agg, col_id, None


def _val_unit(vu, valid, kmap):
    if vu is None:
        return None
    return vu[0], _col_unit(vu[1], valid, kmap), _col_unit(vu[2], valid, kmap)


def _condition(cond: list, valid, kmap, drop_values: bool) -> list:
    out = []
    for i, item in enumerate(cond):
        if i % 2:
            out.append(item)
            continue
        not_op, op, vu, v1, v2 = item
        if drop_values:
            v1 = drop_values_sql(v1) if isinstance(v1, dict) else None
            v2 = drop_values_sql(v2) if isinstance(v2, dict) else None
        out.append((not_op, op, _val_unit(vu, valid, kmap) if valid is not None else vu, v1, v2))
    return out


def drop_values_sql(sql: dict | None) -> dict | None:
    """Replace condition values by None, recursing into nested queries (official rebuild_sql_val)."""
    if sql is None:
        return None
    sql["from"]["conds"] = _condition(sql["from"]["conds"], None, None, True)
    sql["having"] = _condition(sql["having"], None, None, True)
    sql["where"] = _condition(sql["where"], None, None, True)
    for op in ("intersect", "except", "union"):
        sql[op] = drop_values_sql(sql[op])
    return sql


def map_columns_sql(sql: dict | None, valid: set[str], kmap: dict) -> dict | None:
    """Map foreign-key columns and drop DISTINCT (official rebuild_sql_col); `valid` is the outer query's."""
    if sql is None:
        return None
    distinct, units = sql["select"]
    sql["select"] = (None, [(agg, _val_unit(vu, valid, kmap)) for agg, vu in units])
    sql["from"]["table_units"] = [
        (t, _col_unit(x, valid, kmap)) if isinstance(x, tuple) else (t, x) for t, x in sql["from"]["table_units"]]
    sql["from"]["conds"] = _condition(sql["from"]["conds"], valid, kmap, False)
    sql["where"] = _condition(sql["where"], valid, kmap, False)
    sql["groupBy"] = [_col_unit(cu, valid, kmap) for cu in sql["groupBy"]]
    if sql["orderBy"]:
        direction, units = sql["orderBy"]
        sql["orderBy"] = (direction, [_val_unit(vu, valid, kmap) for vu in units])
    sql["having"] = _condition(sql["having"], valid, kmap, False)
    for op in ("intersect", "except", "union"):
        sql[op] = map_columns_sql(sql[op], valid, kmap)
    return sql


def normalise(sql: dict, schema: Schema, kmap: dict) -> dict:
    sql = copy.deepcopy(sql)
    valid = _valid_columns(sql["from"]["table_units"], schema)
    return map_columns_sql(drop_values_sql(sql), valid, kmap)


# ------------------------------------------------------------------ component scores
def _scores(count: int, pred_total: int, label_total: int) -> tuple[int, int, int]:
    if pred_total != label_total:
        return 0, 0, 0
    if count == pred_total:
        return 1, 1, 1
    return 0, 0, 0


def _matched(pred_items: list, label_items: list) -> int:
    """Multiset intersection size, matching each label item at most once."""
    remaining = list(label_items)
    count = 0
    for item in pred_items:
        if item in remaining:
            count += 1
            remaining.remove(item)
    return count


def select_counts(pred, label):
    p, g = pred["select"][1], label["select"][1]
    return len(g), len(p), _matched(p, g), _matched([u[1] for u in p], [u[1] for u in g])


def where_counts(pred, label):
    p, g = pred["where"][::2], label["where"][::2]
    return len(g), len(p), _matched(p, g), _matched([u[2] for u in p], [u[2] for u in g])


def group_counts(pred, label):
    def names(units):  # compared by column name alone, table dropped (official eval_group)
        return [c[1].split(".")[1] if "." in c[1] else c[1] for c in units]
    p, g = names(pred["groupBy"]), names(label["groupBy"])
    return len(g), len(p), _matched(p, g)


def having_counts(pred, label):
    pred_total = int(len(pred["groupBy"]) > 0)
    label_total = int(len(label["groupBy"]) > 0)
    same = [u[1] for u in pred["groupBy"]] == [u[1] for u in label["groupBy"]]
    count = int(pred_total == label_total == 1 and same and pred["having"] == label["having"])
    return label_total, pred_total, count


def order_counts(pred, label):
    pred_total = int(len(pred["orderBy"]) > 0)
    label_total = int(len(label["orderBy"]) > 0)
    limits_agree = (pred["limit"] is None) == (label["limit"] is None)
    count = int(label_total == 1 and pred["orderBy"] == label["orderBy"] and limits_agree)
    return label_total, pred_total, count


def and_or_counts(pred, label):
    """The official returns (len(pred), len(label), 0) into (label_total, pred_total, count): kept as is."""
    p, g = set(pred["where"][1::2]), set(label["where"][1::2])
    if p == g:
        return 1, 1, 1
    return len(p), len(g), 0


def iuen_counts(pred, label):
    label_total = pred_total = count = 0
    for op in ("intersect", "except", "union"):
        p, g = pred[op], label[op]
        pred_total += p is not None
        label_total += g is not None
        if p is not None and g is not None:
            count += exact_match(p, g)[0]
    return label_total, pred_total, count


def keywords(sql: dict) -> set[str]:
    found = set()
    if sql["where"]:
        found.add("where")
    if sql["groupBy"]:
        found.add("group")
    if sql["having"]:
        found.add("having")
    if sql["orderBy"]:
        found.add(sql["orderBy"][0])
        found.add("order")
    if sql["limit"] is not None:
        found.add("limit")
    for op in ("except", "union", "intersect"):
        if sql[op] is not None:
            found.add(op)
    connectors = sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]
    if "or" in connectors:
        found.add("or")
    units = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    if any(u[0] for u in units):
        found.add("not")
    if any(u[1] == WHERE_OPS.index("in") for u in units):
        found.add("in")
    if any(u[1] == WHERE_OPS.index("like") for u in units):
        found.add("like")
    return found


def keyword_counts(pred, label):
    p, g = keywords(pred), keywords(label)
    return len(g), len(p), len(p & g)


def partial_scores(pred: dict, label: dict) -> dict[str, dict]:
    """Per component: acc, rec, f1 and the label/pred totals the averages are weighted by."""
    res = {}

    def put(name, label_total, pred_total, count):
        acc, rec, f1 = _scores(count, pred_total, label_total)
        res[name] = {"acc": acc, "rec": rec, "f1": f1, "label_total": label_total, "pred_total": pred_total}

    lt, pt, cnt, cnt_wo = select_counts(pred, label)
    put("select", lt, pt, cnt)
    put("select(no AGG)", lt, pt, cnt_wo)
    lt, pt, cnt, cnt_wo = where_counts(pred, label)
    put("where", lt, pt, cnt)
    put("where(no OP)", lt, pt, cnt_wo)
    put("group(no Having)", *group_counts(pred, label))
    put("group", *having_counts(pred, label))
    put("order", *order_counts(pred, label))
    put("and/or", *and_or_counts(pred, label))
    put("IUEN", *iuen_counts(pred, label))
    put("keywords", *keyword_counts(pred, label))
    return res


def exact_match(pred: dict, label: dict) -> tuple[int, dict]:
    """(1 or 0, partial scores). Both trees must already be normalised."""
    partial = partial_scores(pred, label)
    if any(score["f1"] != 1 for score in partial.values()):
        return 0, partial
    if label["from"]["table_units"]:
        same = sorted(label["from"]["table_units"], key=repr) == sorted(pred["from"]["table_units"], key=repr)
        return int(same), partial
    return 1, partial
