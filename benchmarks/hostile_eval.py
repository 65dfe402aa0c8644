"""Issue 26's closing check on real Spider dev: hostile prediction lines among real answers.

The DB-GPT-Hub predictions of ../shared/spider-eval-cases are scored twice with `sqltune evaluate` (default
workers): as they are, then with HOSTILE lines put in place of some answers. Reported: the hostile run's wall
time against its bound, (timeout + 2 s) x hostile lines; its peak memory (the sum of the resident sizes of the
evaluate process and all its children, read from /proc every 50 ms); whether any file under the database folder
changed (sha256 of every file before and after); whether every other question scored as in the clean run; and
how long an evaluation busy on runaway queries takes to stop after SIGTERM, and whether any process outlives it.

    python benchmarks/hostile_eval.py [--timeout 5] [--out benchmarks/results/hostile_eval.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqltune.testing import alive, descendants, tree_rss

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT.parent / "shared" / "spider-eval-cases"
SPIDER = ROOT.parent / "shared" / "spider"

_LIKE = ("SELECT 1 WHERE replace(hex(zeroblob({n})), '00', 'aa') LIKE '%' || replace(hex(zeroblob(20000)), '00', "
         "'aa') || 'b%'")
_ROWS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT {n}) SELECT {cols} FROM c"
HOSTILE = {  # what each line tries, as issue 26 found it
    "LIKE over a 2-MB string (one SQLite step)": _LIKE.format(n=1_000_000),
    "GLOB over a 2-MB string": _LIKE.format(n=1_000_000).replace(" LIKE ", " GLOB ").replace("'%'", "'*'")
                                                       .replace("'b%'", "'b*'"),
    "100k rows x 500 numeric columns": _ROWS.format(n=100_000, cols=", ".join(f"x + {i}" for i in range(500))),
    "ORDER BY over 3M rows of 1 kB (a temp-file spill)": _ROWS.format(n=3_000_000, cols="x, hex(zeroblob(500))")
                                                         + " ORDER BY 2 DESC, 1",
    "a 100-MB string in one value": "SELECT hex(zeroblob(50000000))",
    "CREATE TABLE (a write)": "CREATE TABLE evil (x)",
    "ATTACH and write": "ATTACH DATABASE 'x.sqlite' AS x",
    "a 55-MB line": "SELECT 1 WHERE 1 = 1" + " OR 1 = 1" * 6_000_000,
}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def run(pred: Path, gold: Path, report: Path, timeout: float) -> tuple[float, int, int]:
    """(wall seconds, peak tree RSS bytes, exit code) of one `sqltune evaluate`."""
    cmd = [sys.executable, "-m", "sqltune", "evaluate", "--pred", str(pred), "--gold", str(gold), "--db_dir",
           str(SPIDER / "database"), "--tables", str(SPIDER / "tables.json"), "--timeout", str(timeout), "--quiet",
           "--report", str(report)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = proc.wait()
    wall = time.monotonic() - started
    watcher.join()
    return wall, peak[0], code


def stop_time(pred: Path, gold: Path, timeout: float) -> dict:
    """Seconds from SIGTERM to the exit of an evaluation busy on a runaway query, and whether any of its
    processes outlived it (checked 2 s after)."""
    cmd = [sys.executable, "-m", "sqltune", "evaluate", "--pred", str(pred), "--gold", str(gold), "--db_dir",
           str(SPIDER / "database"), "--tables", str(SPIDER / "tables.json"), "--timeout", str(timeout), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3.0)
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    proc.wait()
    seconds = time.monotonic() - started
    time.sleep(2.0)
    return {"sigterm_to_exit_s": round(seconds, 2), "processes_left": sum(alive(p) for p in family)}


def per_example(report: Path) -> list[dict]:
    return [json.loads(line) for line in (report / "per_example.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    real = CASES / "dbgpthub_lora_2023.sql"
    gold = CASES / "dev_gold_no_wta1.sql"
    if not real.is_file() or not (SPIDER / "database").is_dir():
        print("hostile_eval: needs ../shared/spider-eval-cases and ../shared/spider")
        return 2
    lines = real.read_text().split("\n")[:-1]
    n = len(lines)
    places = [round((k + 0.5) * n / len(HOSTILE)) for k in range(len(HOSTILE))]
    hostile_lines = list(lines)
    for place, sql in zip(places, HOSTILE.values()):
        hostile_lines[place] = sql
    before = digest(SPIDER / "database")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "hostile.sql").write_text("".join(line + "\n" for line in hostile_lines))
        clean_wall, clean_peak, clean_code = run(real, gold, tmp / "clean", args.timeout)
        wall, peak, code = run(tmp / "hostile.sql", gold, tmp / "hostile", args.timeout)
        clean, hostile = per_example(tmp / "clean"), per_example(tmp / "hostile")
        (tmp / "runaway.sql").write_text("".join(HOSTILE["LIKE over a 2-MB string (one SQLite step)"] + "\n"
                                                 for _ in lines))
        stop = stop_time(tmp / "runaway.sql", gold, 600.0)
    after = digest(SPIDER / "database")
    others = [i for i in range(n) if i not in set(places)]
    same = all(clean[i]["ex"] == hostile[i]["ex"] and clean[i]["em"] == hostile[i]["em"] for i in others)
    bound = (args.timeout + 2) * len(HOSTILE)
    result = {
        "questions": n, "hostile_lines": len(HOSTILE), "timeout_s": args.timeout,
        "clean": {"wall_s": round(clean_wall, 2), "peak_rss_mb": round(clean_peak / 2**20), "exit": clean_code},
        "hostile": {"wall_s": round(wall, 2), "bound_s": bound, "within_bound": wall <= bound,
                    "peak_rss_mb": round(peak / 2**20), "under_1_gb": peak < 2**30, "exit": code},
        "stop": stop, "databases_unchanged": before == after, "other_questions_scored_as_clean": same,
        "hostile_results": {name: {"ex": hostile[p]["ex"], "error": hostile[p]["error"]}
                            for name, p in zip(HOSTILE, places)},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    ok = code == 0 and wall <= bound and peak < 2**30 and before == after and same and not stop["processes_left"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
