"""The GRPO reward: each completion's SQL run against its question's gold query, scored by what happened.

A completion's SQL is read out exactly as predict reads it (sqltune.infer.extract with the template's end marker),
then scored exactly as evaluate scores a prediction (sqltune.eval.execution.exec_match: Spider's `value` rule,
DISTINCT dropped, any column order, every SQLite file of a test-suite folder; BIRD's sets of rows for a BIRD
dataset), and only ever run in the sandbox (sqltune.sandbox: read-only, in worker processes killed past
`--reward_timeout`, bounded in rows, bytes and memory). One pool of workers serves the whole run; each worker keeps
its read-only connections and caches gold results, and completions of one database go to the same worker.

Outcomes and their default reward (`--reward_shape MATCH,RUNS,FAILS[,NO_SQL]`):
- match: EX would score it right -> 1.0
- runs: it runs but its result is not the gold's -> 0.1
- fails: an error, a timeout, a worker killed past its deadline, more rows or bytes than allowed -> 0.0
- no_sql: no query found in the completion (predict would write `SELECT`, which fails) -> the fails value unless a
  fourth value is given.
A question whose gold query itself fails gets no reward (None): TRL leaves it out of the advantages and the figures,
instead of teaching the model that nothing works there; such completions are counted (`sql/gold_failed`).
"""

from __future__ import annotations

from pathlib import Path

from sqltune.config.train import REWARD_OUTCOMES as OUTCOMES, reward_shape_values
from sqltune.errors import SqltuneError
from sqltune.eval.execution import exec_match
from sqltune.infer.extract import extract_sql
from sqltune.sandbox import Limits, QueryError, Sandbox, default_workers, too_long

GOLD_FAILED = "gold_failed"


def outcome(item: tuple[str, str, str, bool]) -> str:
    """The outcome of one (database path, extracted SQL, gold SQL, bird) in a sandbox worker: match, runs, fails,
    no_sql or gold_failed; what evaluate would score (EX) for this prediction."""
    from sqltune.eval.execution import gold_result, run, spider_form

    db_path, sql, gold, bird = item
    if not sql.strip():
        return "no_sql"
    if too_long(sql):
        return "fails"
    path = Path(db_path)
    if bird:  # BIRD EX: set(predicted rows) == set(gold rows), the SQL as written
        gold_rows = gold_result(path, gold)
        if isinstance(gold_rows, QueryError):
            return GOLD_FAILED
        try:
            return "match" if set(run(path, sql, "predicted query")) == set(gold_rows) else "runs"
        except QueryError:
            return "fails"
    ex, error, gold_error = exec_match(path, spider_form(sql, False), gold, False, False)
    if gold_error:
        return GOLD_FAILED
    return "match" if ex else ("fails" if error else "runs")


DIED = "died"  # a worker that stopped on its own (not killed past a deadline): the memory bound, or a broken sandbox


def _killed(item, reason: str, phase: str, step: int) -> str:
    """The outcome of an item whose worker was killed past its deadline or died: its gold query's failure when that
    was what ran, else the completion's (a death is told apart, see SqlReward.outcomes)."""
    if phase == "gold query":
        return GOLD_FAILED
    return DIED if reason.startswith("worker stopped") else "fails"


class SqlReward:
    """A reward function for TRL's GRPOTrainer: called with the completions (text) and the dataset's `gold` and
    `db_path` columns, it returns one reward per completion (None where the gold query fails). `end` is the
    template's end marker text (as predict passes it to extract_sql); `bird` scores with BIRD's rule. close() at the
    end of training stops the workers."""

    __name__ = "sql_execution"  # TRL logs rewards/<name>/mean and /std

    def __init__(self, shape: str | dict = "1.0,0.1,0", end: str | None = None, timeout: float = 30.0,
                 bird: bool = False, workers: int = 0, max_rows: int = 100_000, memory_mb: int = 768):
        self.values = reward_shape_values(shape) if isinstance(shape, str) else dict(shape)
        self.end, self.bird = end, bird
        self.sandbox = Sandbox(default_workers(workers, 64), Limits(timeout=timeout, max_rows=max_rows,
                                                                    memory_bytes=memory_mb << 20))
        self.counts = {name: 0 for name in (*OUTCOMES, GOLD_FAILED)}

    def outcomes(self, completions: list, gold: list[str], db_path: list[str]) -> list[str]:
        """match / runs / fails / no_sql / gold_failed per completion."""
        sqls = [extract_sql(_text(c), self.end) for c in completions]
        items = [(str(db), sql, g, self.bird) for db, sql, g in zip(db_path, sqls, gold)]
        found = self.sandbox.map(outcome, items, key=lambda item: item[0], on_fail=_killed)
        if found and all(f == DIED for f in found):  # no completion at all could be run: training would learn nothing
            raise SqltuneError(f"the reward's sandbox workers stopped on all {len(found)} completions of a step "
                               "(they could not start, or every query outgrew the memory bound): stopped training")
        return ["fails" if f == DIED else f for f in found]

    def __call__(self, prompts=None, completions=None, gold=None, db_path=None, log_metric=None, **kwargs) -> list:
        if completions is None or gold is None or db_path is None:
            raise SqltuneError("the SQL reward needs the completions and the dataset's `gold` and `db_path` columns")
        found = self.outcomes(completions, gold, db_path)
        for name in found:
            self.counts[name] += 1
        if log_metric is not None and found:
            for name in (*OUTCOMES, GOLD_FAILED):
                log_metric(f"sql/{name}", sum(f == name for f in found) / len(found))
        return [None if f == GOLD_FAILED else self.values[f] for f in found]

    def close(self) -> None:
        self.sandbox.close()


def _text(completion) -> str:
    """A completion's text: TRL passes a string for plain-text prompts, a list of messages for chat prompts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)
