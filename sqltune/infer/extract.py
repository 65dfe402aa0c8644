"""Getting one line of SQL out of what a model wrote.

Rules, in order: take the first fenced code block if there is one; drop an echoed prompt (everything up to the
last `###Response:`); start at the first SELECT/WITH keyword when the text has one; stop at the first `;`, at a
blank line, or at a line of explanation; fold whitespace (newlines included) into single spaces. Text with no SQL
in it is kept as the model wrote it, folded, so that every record keeps its line.
"""

from __future__ import annotations

import re

from sqltune.sqltext import fold

_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)(?:```|$)", re.S)
_START = re.compile(r"\b(SELECT|WITH)\b", re.I)
_PROSE = re.compile(r"^\s*(this|the|here|explanation|note|it|which|in this|above|output|result)\b[^;]*", re.I)


def extract_sql(text: str) -> str:
    fenced = _FENCE.search(text)
    if fenced and fenced.group(1).strip():
        text = fenced.group(1)
    if "###Response:" in text:
        text = text.rsplit("###Response:", 1)[1]
    start = _START.search(text)
    if start is None:
        return fold(text)
    text = text[start.start():]
    kept = []
    for line in text.split("\n"):
        if kept and (not line.strip() or _PROSE.match(line)):
            break
        kept.append(line)
    sql = "\n".join(kept)
    if ";" in sql:
        sql = sql[: sql.index(";")]
    return fold(sql)
