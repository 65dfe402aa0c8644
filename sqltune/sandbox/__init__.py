"""The one executor for SQL that sqltune runs (evaluation, the vote, prepare's gold check, and what comes next).

Model-written SQL is hostile until proven otherwise: it runs read-only (readonly.py), in worker processes with an
address-space limit that the parent kills past each step's deadline (pool.py, worker.py), with every result
bounded in rows and bytes. Data, inference and evaluation import it; it imports none of them.
"""

from sqltune.sandbox.health import SQLITE_HEADER, database_problem, is_sqlite_file
from sqltune.sandbox.pool import Killed, Sandbox, default_workers
from sqltune.sandbox.readonly import MB, QueryError, result_size
from sqltune.sandbox.worker import (GRACE, MAX_SQL_BYTES, Limits, count_rows, in_worker, limits, query, set_step,
                                    shown_rows, too_long)

__all__ = ["GRACE", "MAX_SQL_BYTES", "MB", "SQLITE_HEADER", "Killed", "Limits", "QueryError", "Sandbox",
           "count_rows", "database_problem", "default_workers", "in_worker", "is_sqlite_file", "limits", "query",
           "result_size", "set_step", "shown_rows", "too_long"]
