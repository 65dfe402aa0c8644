"""Tokenising SQL as the official Spider parser does (process_sql.tokenize).

Rule: single quotes become double quotes; each quoted string is kept whole as one token (with its quotes and
case); the rest is split by the Penn-Treebank word tokenizer rules that NLTK's `word_tokenize` applies, then
lower-cased; `!`, `>`, `<` followed by a separate `=` are joined back into `!=`, `>=`, `<=`.

Only the Treebank rules that can fire once quotes are gone are kept here. NLTK's sentence splitter (Punkt) runs
before them in the official script; it only matters for text with sentence-like periods, which is not SQL.
"""

from __future__ import annotations

import re

_RULES = [
    # starting quotes (backticks and typographic quotes stand alone)
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    # punctuation
    (re.compile(r"([^\.])(\.)([\]\)}>\"'»”’ ]*+)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),  # a comma before a digit stays attached ("1,2")
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r"([^\.])(\.)([\]\)}>\"']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
    # brackets (note: `<` and `>` are split off, `=` is not)
    (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
]
_ENDING = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"\s+"), " "),
]
_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b", r"(?i)\b(got)(ta)\b",
    r"(?i)\b(lem)(me)\b", r"(?i)\b(wan)(na)(?=\s)",
)]


def treebank_split(text: str) -> list[str]:
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    text = " " + text + " "
    for pattern, repl in _ENDING:
        text = pattern.sub(repl, text)
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


class QuoteError(ValueError):
    """An odd number of quote characters: the query cannot be tokenised."""


def tokenize(sql: str) -> list[str]:
    """Lower-cased tokens, quoted strings kept whole (the official `tokenize`)."""
    text = str(sql).replace("'", '"')
    quotes = [i for i, ch in enumerate(text) if ch == '"']
    if len(quotes) % 2:
        raise QuoteError("unexpected quote")
    values = {}
    for i in range(len(quotes) - 1, -1, -2):  # right to left so earlier indices stay valid
        start, end = quotes[i - 1], quotes[i]
        key = f"__val_{start}_{end}__"
        values[key] = text[start:end + 1]
        text = text[:start] + key + text[end + 1:]
    toks = [values.get(t.lower(), t.lower()) for t in treebank_split(text)]
    for i in range(len(toks) - 1, 0, -1):  # `!` `=` -> `!=`, etc. (right to left, as the official)
        if i < len(toks) and toks[i] == "=" and toks[i - 1] in ("!", ">", "<"):
            toks[i - 1: i + 1] = [toks[i - 1] + "="]
    return toks
