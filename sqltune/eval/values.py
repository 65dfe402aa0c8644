"""Value plugging (`--plug_value`, the official parse.get_all_preds_for_execution).

Rule: the values of the gold query (quoted strings and numbers, found with sqlparse) are collected as a set; the
prediction's own values are replaced by slots; every way of filling the slots with gold values is a candidate,
and the prediction counts as correct when its own text or any candidate executes to the gold result.
"""

from __future__ import annotations

import itertools
import re
from typing import Iterator

import sqlparse
from sqlparse import tokens as T

from sqltune.sqltext import first_statement_tokens

SLOT = "VALUERARE"
_TABLE_STARS = ("t1.*", "t2.*", "t3.*", "T1.*", "T2.*", "T3.*")


def _flat(query: str) -> list[tuple]:
    tokens = first_statement_tokens(query)
    if tokens is None:
        raise ValueError("empty query")
    return tokens


def _reformat(query: str) -> str:
    query = query.strip().replace(";", "").replace("\t", "")
    query = " ".join(value for ttype, value in _flat(query) if ttype != T.Whitespace)
    for star in _TABLE_STARS:
        query = query.replace(star, "*")
    return query


def _strip_values(query: str) -> tuple[list[str], list[str]]:
    """Tokens with each value replaced by the slot, and the values found (strings, then floats, then ints)."""
    values: list[str] = []
    strings = [value for ttype, value in _flat(query) if ttype in (T.Literal.String.Single, T.Literal.String.Symbol)]
    for val in strings:
        values.append(val)
        query = query.replace(val.strip(), SLOT)
    toks = query.split()
    floats = re.findall(r"[-+]?\d*\.\d+", query)
    values += [t for t in toks if t in floats]
    toks = [SLOT if t in floats else t for t in toks]
    query = " ".join(toks)
    ints = [i.strip() for i in re.findall(r"[^tT]\d+", query)]
    values += [t for t in toks if t in ints]
    toks = [SLOT if t in ints else t for t in toks]
    words: list[str] = []
    for tok in toks:
        if "." in tok and re.findall(r"[Tt]\d+\.", tok):
            words.extend(part.lower() for part in tok.replace(".", " . ").split() if part)
        elif tok:
            words.append(tok.lower())
    return words, values


def extract_values(sql: str) -> tuple[list[str], set[str]]:
    sql = sqlparse.format(_reformat(sql), reindent=False, keyword_case="upper")
    sql = re.sub(r"(T\d+\.)\s", r"\1", sql)
    words, values = _strip_values(sql)
    return words, set(values)


def plugged_candidates(gold: str, pred: str) -> Iterator[str]:
    """Every filling of the prediction's value slots with the gold query's values (parsed now, filled lazily)."""
    _, gold_values = extract_values(gold)
    words, _ = extract_values(pred)
    slot = SLOT.lower()
    positions = [i for i, w in enumerate(words) if w == slot]
    return _fillings(words, positions, sorted(gold_values))


def _fillings(words: list[str], positions: list[int], choices: list[str]) -> Iterator[str]:
    for filling in itertools.product(choices, repeat=len(positions)):
        out = list(words)
        for i, value in zip(positions, filling):
            out[i] = value
        yield " ".join(out)
