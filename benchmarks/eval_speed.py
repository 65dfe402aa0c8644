"""How much faster `sqltune evaluate` is than sequential execution of the same pairs, measured in one run.

Baseline: what the official script does — one pair after another, a fresh connection for every query, the gold
query executed again for every prediction, no worker processes — built from the same parsing and comparison code,
so the figures must be identical. Ours: gold results cached per (database, query), connections reused, pairs
grouped by database and scored in the sandbox's `--workers` processes (the whole command, interpreter start
included). With `--before REF` the same command at git commit REF (checked out into a temporary worktree) is an
arm too, alternated with ours: the throughput ratio of a change to the evaluator, measured in one run.

Fair timing: every arm runs once untimed first (page cache and databases warm for all), then the arms alternate
(baseline, ours[, official]) for --repeats rounds; each figure is the median of its rounds.

    python benchmarks/eval_speed.py [--pred P --gold G --db_dir D --tables T] [--workers N] [--before REF]
                                    [--official DIR]

Defaults: the DB-GPT-Hub predictions on Spider dev from ../shared/spider-eval-cases. With `--official DIR`
(a checkout of taoyds/test-suite-sql-eval you provide) and `--official_python` (a Python with nltk, its punkt data,
and sqlparse), the official script is timed on the same files too. It opens databases read-write: point --db_dir
at a copy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import shutil
import tempfile

from sqltune.config import EvalConfig
from sqltune.eval import evaluate as ev
from sqltune.eval.files import read_pairs
from sqltune.eval.scoring import init_worker, score_pair
from sqltune.eval.scores import aggregate

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT.parent / "shared" / "spider-eval-cases"
SPIDER = ROOT.parent / "shared" / "spider"


def sequential(cfg: EvalConfig) -> dict:
    """Every pair in this process, one after another: outside a sandbox worker each query opens its own
    connection, and with the gold cache off every gold query runs again (the official script's way)."""
    pairs, multi_turn, _, _ = read_pairs(cfg)
    kmaps, tables = ev.load_tables(cfg.tables)
    init_worker(cfg, kmaps, tables, {}, cache=False)
    results = [score_pair(p) for p in pairs]
    return aggregate([r for r in results if r["hardness"]], multi_turn, cfg.etype)


@contextmanager
def worktree(ref: str):
    """The repository at `ref`, checked out into a temporary folder (removed afterwards)."""
    folder = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder / "tree"), ref], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield folder / "tree"
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder / "tree")], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", default=str(CASES / "dbgpthub_lora_2023.sql"))
    parser.add_argument("--gold", default=str(CASES / "dev_gold_no_wta1.sql"))
    parser.add_argument("--db_dir", default=str(SPIDER / "database"))
    parser.add_argument("--tables", default=str(SPIDER / "tables.json"))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per arm (the median is reported)")
    parser.add_argument("--before", default="", help="a git commit whose `sqltune evaluate` is timed as an arm too")
    parser.add_argument("--official", default="", help="folder holding the official evaluation.py (optional)")
    parser.add_argument("--official_python", default=sys.executable, help="a Python with nltk (+punkt) and sqlparse")
    args = parser.parse_args(argv)
    if not Path(args.pred).is_file():
        print(f"eval_speed: {args.pred} not found (needs ../shared or --pred/--gold/--db_dir/--tables)")
        return 2
    cfg = EvalConfig(pred=args.pred, gold=args.gold, db_dir=args.db_dir, tables=args.tables, quiet=True,
                     workers=args.workers)
    results = {}

    def baseline():
        results["base"] = sequential(cfg)

    def ours():
        cmd = [sys.executable, "-m", "sqltune", "evaluate", "--pred", args.pred, "--gold", args.gold, "--db_dir",
               args.db_dir, "--tables", args.tables, "--quiet", "--workers", str(args.workers)]
        subprocess.run(cmd, check=True)

    def before():
        cmd = [sys.executable, "-m", "sqltune", "evaluate", "--pred", args.pred, "--gold", args.gold, "--db_dir",
               args.db_dir, "--tables", args.tables, "--quiet", "--workers", str(args.workers)]
        subprocess.run(cmd, check=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})

    def official():
        subprocess.run([args.official_python, "evaluation.py", "--gold", str(Path(args.gold).resolve()), "--pred",
                        str(Path(args.pred).resolve()), "--db", str(Path(args.db_dir).resolve()), "--table",
                        str(Path(args.tables).resolve()), "--etype", "all"], cwd=args.official, check=True,
                       stdout=subprocess.DEVNULL)

    arms = {"baseline": baseline, "ours": ours, **({"before": before} if args.before else {}),
            **({"official": official} if args.official else {})}
    with worktree(args.before) if args.before else nullcontext(ROOT) as tree:
        for fn in arms.values():  # warm-up, untimed: every arm meets a warm page cache
            fn()
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(max(1, args.repeats)):
            for name, fn in arms.items():
                times[name].append(timed(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base, ours_scores = results["base"], ev.evaluate(cfg)["details"]["scores"]
    same = all(f"{ours_scores[k]['exec']:.3f}" == f"{base[k]['exec']:.3f}" and f"{ours_scores[k]['exact']:.3f}" ==
               f"{base[k]['exact']:.3f}" for k in ("easy", "medium", "hard", "extra", "all"))
    rounds = ", ".join(f"{t:.2f}" for t in times["ours"])
    print(f"pairs: {ours_scores['all']['count']}, workers: {args.workers or os.cpu_count()}, figures identical: {same}")
    print(f"median of {len(times['ours'])} alternating rounds after one warm-up round per arm")
    print(f"sequential baseline (in-process): {med['baseline']:.2f} s")
    print(f"sqltune evaluate (whole command):  {med['ours']:.2f} s  (rounds: {rounds})")
    if args.before:
        print(f"sqltune evaluate at {args.before} (whole command): {med['before']:.2f} s -> this tree's throughput is "
              f"{med['before'] / med['ours']:.2f}x its (rounds: {', '.join(f'{t:.2f}' for t in times['before'])})")
    if args.official:
        print(f"official evaluation.py (whole command): {med['official']:.2f} s -> sqltune is "
              f"{med['official'] / med['ours']:.1f}x faster")
    print(f"speed-up: {med['baseline'] / med['ours']:.1f}x")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
