"""SQL as one line of text: the form gold files and prediction files hold (one query per line)."""

from __future__ import annotations


def fold(text: str) -> str:
    """Runs of whitespace (newlines included) become single spaces; the ends are stripped."""
    return " ".join(text.split())
