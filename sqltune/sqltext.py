"""SQL as one line of text: the form gold files and prediction files hold (one query per line)."""

from __future__ import annotations

from sqlparse import lexer
from sqlparse.engine import StatementSplitter


def fold(text: str) -> str:
    """Runs of whitespace (newlines included) become single spaces; the ends are stripped."""
    return " ".join(text.split())


def first_statement_tokens(query: str) -> list[tuple] | None:
    """(ttype, text) of the first statement's tokens, as `sqlparse.parse(query)[0].flatten()` gives them.

    The statement splitter alone yields the same leaf tokens without sqlparse's costly grouping pass (the leaves
    are what the official rules read). None when the text holds no statement.
    """
    statement = next(iter(StatementSplitter().process(lexer.tokenize(query))), None)
    if statement is None:
        return None
    return [(tok.ttype, tok.value) for tok in statement.flatten()]
