"""How long `sqltune ask` takes for one answer once everything is loaded (issue 27's goal: under 2 s for
Qwen2.5-Coder-0.5B on this CPU with a warm engine).

Questions: Spider dev questions on one database (--db_id, default: the one with most dev questions), asked as a user
asks about their own database: the schema read from the SQLite file, rendered in --schema_style (the Spider recipe's
ddl+rows with one row by default). Arms, each loaded once and warmed up with one question before timing:

- `hf`: ask's transformers backend in this process (the model loaded once, as `ask` reading questions from stdin);
- `endpoint`: ask --endpoint against `sqltune serve` (vLLM's OpenAI server, started here with the vLLM environment's
  Python, --vllm_python, and waited for; prefix caching on, so the schema's tokens are computed once per database).

The arms alternate question by question; each answer's time runs from the question to the printed result (prompt,
generation, the SQL run in the sandbox). Printed per arm: median, mean, 90th percentile and max seconds, and how many
answers the two arms agree on (the same SQL).

    python benchmarks/ask_latency.py --model qwen2.5-coder-0.5b-instruct --questions 20 [--arms hf,endpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dev_questions(spider: Path, db_id: str) -> tuple[str, list[str]]:
    """(db_id, its dev questions): the database asked about, by default the one with most dev questions."""
    dev = json.loads((spider / "dev.json").read_text())
    present = [d for d in dev if (spider / "database" / d["db_id"] / f"{d['db_id']}.sqlite").is_file()]
    db_id = db_id or Counter(d["db_id"] for d in present).most_common(1)[0][0]
    return db_id, [d["question"] for d in present if d["db_id"] == db_id]


def start_server(a, model: str, log: Path) -> subprocess.Popen:
    """`sqltune serve` in the vLLM environment, in its own process group; returns once /v1/models answers."""
    argv = [a.vllm_python, "-m", "sqltune", "serve", "--model_name_or_path", model, "--port", str(a.port),
            "--template", a.template, "--kv_cache_gb", str(a.kv_cache_gb), "--max_source_length",
            str(a.max_source_length), "--max_new_tokens", str(a.max_new_tokens)]
    argv += ["--enforce_eager"] if a.enforce_eager else []
    argv += ["--dtype", a.dtype] if a.dtype != "auto" else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = time.time()
    while time.time() - started < a.server_timeout:
        if proc.poll() is not None:
            raise SystemExit(f"ask_latency: the server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{a.port}/v1/models", timeout=2):
                print(f"server up in {time.time() - started:.1f} s", flush=True)
                return proc
        except OSError:
            time.sleep(2)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(f"ask_latency: no server after {a.server_timeout} s; see {log}")


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"n": len(seconds), "median_s": round(statistics.median(ordered), 3),
            "mean_s": round(statistics.fmean(ordered), 3),
            "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3), "max_s": round(ordered[-1], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--spider", default=str(ROOT.parent / "shared" / "spider"))
    p.add_argument("--db_id", default="")
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--arms", default="hf,endpoint")
    p.add_argument("--template", default="chatml")
    p.add_argument("--schema_style", default="ddl+rows")
    p.add_argument("--sample_rows", type=int, default=1)
    p.add_argument("--max_source_length", type=int, default=768)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--vllm_python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--enforce_eager", action="store_true")
    p.add_argument("--dtype", default="auto", help="weights of both arms: auto (float32 on a CPU), float32, bfloat16")
    p.add_argument("--kv_cache_gb", type=float, default=2)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--server_timeout", type=float, default=900)
    p.add_argument("--out", default="", help="write the figures as JSON here")
    a = p.parse_args(argv)
    if not (Path(a.spider) / "dev.json").is_file():  # before any model is fetched or server started
        print(f"ask_latency: --spider {a.spider} has no dev.json (a Spider folder: dev.json and database/)")
        return 2

    from sqltune.catalog import fetch
    from sqltune.config import AskConfig
    from sqltune.infer.ask import Asker

    arms = [x for x in a.arms.split(",") if x]
    model = str(fetch(a.model)) if not Path(a.model).is_dir() else a.model
    spider = Path(a.spider)
    db_id, questions = dev_questions(spider, a.db_id)
    questions = questions[:a.questions + 1]  # the first warms up
    db = spider / "database" / db_id / f"{db_id}.sqlite"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "ask_latency_server.log"
    server = start_server(a, model, log) if "endpoint" in arms else None
    common = dict(model_name_or_path=model, db=str(db), template=a.template, schema_style=a.schema_style,
                  sample_rows=a.sample_rows, max_source_length=a.max_source_length, max_new_tokens=a.max_new_tokens,
                  dtype=a.dtype)
    askers = {}
    try:
        for arm in arms:
            extra = {"endpoint": f"http://127.0.0.1:{a.port}"} if arm == "endpoint" else {}
            askers[arm] = Asker(AskConfig(**common, **extra)).__enter__()
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        sql: dict[str, list[str]] = {arm: [] for arm in arms}
        for i, question in enumerate(questions):
            order = arms if i % 2 == 0 else arms[::-1]
            for arm in order:
                started = time.perf_counter()
                answer, _ = askers[arm].answer(question)
                took = time.perf_counter() - started
                if i:
                    times[arm].append(took)
                    sql[arm].append(answer["sql"])
            print(f"{i:3d} " + "  ".join(f"{arm} {times[arm][-1]:.2f} s" for arm in arms if i), flush=True)
    finally:
        for asker in askers.values():
            asker.__exit__(None, None, None)
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    result = {"command": "python benchmarks/ask_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": a.model, "db_id": db_id, "questions": len(questions) - 1, "cpu_count": os.cpu_count(),
              "arms": {arm: summary(times[arm]) for arm in arms}}
    if len(arms) == 2:
        result["same_sql"] = sum(x == y for x, y in zip(*sql.values()))
    for arm, s in result["arms"].items():
        print(f"{arm:9s} median {s['median_s']:.2f} s, mean {s['mean_s']:.2f} s, p90 {s['p90_s']:.2f} s, "
              f"max {s['max_s']:.2f} s over {s['n']} questions on {db_id}")
    if "same_sql" in result:
        print(f"the same SQL from both arms: {result['same_sql']}/{len(questions) - 1}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
