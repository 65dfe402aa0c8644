"""CoSQL (SQL state tracking) has SParC's layout; the gold file we write follows our record order."""

from sqltune.data.sources.sparc import load  # noqa: F401  (same reader)
