"""One progress display for every long stage (prepare, train, predict and the vote's sampling, evaluate).

On a terminal it is a tqdm bar (`n/total [elapsed<remaining, rate, postfix]`). In a log file (stderr not a terminal)
a bar's carriage returns would show only its first frame, so it prints whole lines instead, and fewer of them: one
whenever `every_fraction` of the total or `every_s` seconds have passed, never within `min_s` (MIN_S) of the last, and
one for the last count when lines were printed, the work took `min_s` or more, or `summary` asks for it (how long the
whole took, the last loss): work of a few seconds leaves the log alone. Each line says
`desc: n/total [elapsed<remaining, rate, postfix]`. With `quiet` nothing is printed. It writes to stderr only, never
to a result file.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm

from sqltune.errors import SqltuneError

MIN_S = 5.0  # seconds between two lines in a log at least
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class Progress:
    """A progress display for `total` units; `update(n)` after each piece of work, `postfix(...)` for figures such as
    the last loss, `close()` at the end (or use it as a context manager)."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, quiet: bool = False, initial: int = 0,
                 stream: TextIO | None = None, every_s: float = 60.0, every_fraction: float = 0.1, min_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, leave: bool = True, summary: bool = False):
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise SqltuneError(f"progress: total must be a whole number >= 0, not {total!r}")
        if not 0 <= initial <= total:
            raise SqltuneError(f"progress: initial must be between 0 and the total {total}, not {initial!r}")
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.stream = sys.stderr if stream is None else stream  # looked up now: a test's or a caller's redirect holds
        self.every_s, self.every_fraction, self.clock, self.summary = every_s, every_fraction, clock, summary
        self.min_s = MIN_S if min_s is None else min_s
        self.text = ""
        self.bar = None
        self.mode = "off" if quiet or total == 0 else ("bar" if _isatty(self.stream) else "lines")
        if self.mode == "bar":
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=leave, mininterval=0.5)
        self.start = self.last_t = clock()
        self.last_n = initial
        self.printed = False

    def postfix(self, **figures) -> None:
        """Figures shown after the rate, e.g. postfix(loss="0.4312", lr="2e-04"); floats get 4 significant digits."""
        self.text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.advance_to(self.n + n)

    def advance_to(self, n: int) -> None:
        """Set the count (e.g. the trainer's global step); in a log, print a line when one is due."""
        n = min(max(n, self.n), self.total)
        if self.bar is not None:
            self.bar.update(n - self.n)
        self.n = n
        if self.mode != "lines" or n == self.last_n:
            return
        now = self.clock()
        since = now - self.last_t
        if n >= self.total:
            self._last(now)
        elif since >= self.min_s and (n - self.last_n >= self.every_fraction * self.total or since >= self.every_s):
            self._line(now)

    def line(self, now: float | None = None) -> str:
        """The log line for the current count: `desc: n/total [elapsed<remaining, rate, postfix]`."""
        now = self.clock() if now is None else now
        return tqdm.format_meter(self.n, self.total, max(now - self.start, 0.0), prefix=self.desc, unit=self.unit,
                                 bar_format=LINE_FORMAT, postfix=self.text or None, initial=self.initial)

    def _line(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self.last_n, self.last_t, self.printed = self.n, now, True

    def _last(self, now: float) -> None:
        if self.n != self.last_n and (self.printed or self.summary or now - self.start >= self.min_s):
            self._line(now)

    def close(self) -> None:
        """End the display; in a log, the last count is printed when the last line did not show it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines":
            self._last(self.clock())
        self.mode = "off"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_libraries() -> None:
    """With --quiet, transformers' own bars (loading and writing model shards) are turned off too, for the rest of
    the process: a quiet stage prints no progress of any kind."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
