"""Re-vote a spider_dev run's stored candidates under each vote rule, with no model (issue #16, section 1).

The vote arm of `benchmarks/spider_dev.py` keeps every candidate of every question in `<arm>.sql.raw.jsonl`. This
runs the vote again on those same candidates, once per rule, evaluates each answer file the same way the arm was
evaluated, and prints EX per rule with the questions each rule turned right and wrong against the stored vote:

- `count`: the largest group of equal results wins (`predict --vote execution`);
- `prefer_rows`: a group whose result has rows beats any group with an empty result (`--prefer_rows`).

The rule the arm was voted with (each raw record says it) must give the stored answers again: checked, a difference
is printed. Gains and losses are counted against the stored vote, whichever rule made it.

    python benchmarks/vote_rules.py --run runs/spider_dev_v03 [--arm finetuned_vote8]

Writes `<run>/vote_rules/<arm>_<rule>.sql`, each rule's evaluation report and results.json there. Execution only
(the candidates' SQL runs with the evaluator's safe executor); nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqltune.eval.files import read_lines  # noqa: E402
from sqltune.io import read_jsonl  # noqa: E402
from spider_dev import command_line, dev_db_dir, devsample_evaluation, run_stage  # noqa: E402

RULES = {"count": False, "prefer_rows": True}


def revote(raw: list[dict], db_dir: Path, prefer_rows: bool) -> list[dict]:
    """The raw records with `sql` chosen again from their stored candidates."""
    from sqltune.infer.vote import make_executor, vote

    executor = make_executor()
    try:
        rows = []
        for r in raw:
            cands = [{k: c.get(k) for k in ("source", "sql", "logprob", "new_tokens", "text")}
                     for c in r["vote"]["candidates"]]
            sql, _ = vote(cands, db_dir / r["db_id"] / f"{r['db_id']}.sqlite", executor, prefer_rows=prefer_rows)
            rows.append({**r, "sql": sql})
        return rows
    finally:
        executor.close()


def stored_rule(raw: list[dict]) -> str:
    """The rule the stored vote used, from its records (`prefer_rows` is absent in runs older than the option)."""
    used = {bool(r["vote"].get("prefer_rows", False)) for r in raw}
    if len(used) != 1:
        raise SystemExit("vote_rules: the stored records were voted under both rules (a resumed run with another "
                         "--prefer_rows?); re-run the arm")
    prefer_rows = used.pop()
    return next(rule for rule, prefer in RULES.items() if prefer == prefer_rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a benchmarks/spider_dev.py --out folder with a vote arm")
    p.add_argument("--arm", default="finetuned_vote8", help="the vote arm: <run>/<arm>.sql.raw.jsonl")
    a = p.parse_args(argv)
    from sqltune.infer.outputs import sql_text

    run = Path(a.run)
    raw_path = run / f"{a.arm}.sql.raw.jsonl"
    if not raw_path.is_file():
        raise SystemExit(f"vote_rules: {raw_path} is missing (run benchmarks/spider_dev.py with a vote arm first)")
    raw = list(read_jsonl(raw_path))
    if not raw or any((r.get("vote") or {}).get("method") != "execution" for r in raw):
        raise SystemExit(f"vote_rules: {raw_path} is no execution vote (every record needs its candidates)")
    rule_used = stored_rule(raw)
    data = run / "data"
    db_dir = dev_db_dir(data)
    out = run / "vote_rules"
    out.mkdir(exist_ok=True)
    stored = read_lines(run / f"{a.arm}.sql", "predictions")
    evaluate = devsample_evaluation(data) + ["--quiet"]
    env = {**os.environ, "SQLTUNE_RUNS_DIR": str(out / "runs")}
    log: dict = {}
    per_rule: dict = {}
    stored_ex = [r["ex"] for r in read_jsonl(run / f"eval_{a.arm}" / "per_example.jsonl")]
    for rule, prefer_rows in RULES.items():
        pred = out / f"{a.arm}_{rule}.sql"
        pred.write_text(sql_text(revote(raw, db_dir, prefer_rows)))
        changed = sum(x != y for x, y in zip(read_lines(pred, "predictions"), stored))
        run_stage(f"evaluate_{rule}", ["evaluate", "--pred", str(pred), "--report", str(out / f"eval_{rule}")]
                  + evaluate, log, env)
        ex = [r["ex"] for r in read_jsonl(out / f"eval_{rule}" / "per_example.jsonl")]
        per_rule[rule] = {"ex": round(sum(ex) / len(ex), 4), "right": sum(ex), "changed_answers": changed,
                          "gained": sum(e and not s for e, s in zip(ex, stored_ex)),
                          "lost": sum(s and not e for e, s in zip(ex, stored_ex))}
    if per_rule[rule_used]["changed_answers"]:
        print(f"vote_rules: the {rule_used} rule, the stored vote's own, differs from it on "
              f"{per_rule[rule_used]['changed_answers']} questions (a candidate that timed out then, or code changed "
              "since)")
    print(f"{a.arm} of {run}: {len(raw)} questions, stored vote ({rule_used} rule) EX "
          f"{sum(stored_ex) / len(stored_ex):.3f}")
    for rule, r in per_rule.items():
        print(f"  {rule:12s} EX {r['ex']:.3f}  ({r['right']} right; {r['changed_answers']} answers differ from the "
              f"stored vote: {r['gained']} turned right, {r['lost']} turned wrong)")
    summary = {"command": command_line("vote_rules.py", argv), "run": str(run), "arm": a.arm,
               "questions": len(raw), "stored_rule": rule_used, "stored_ex": round(sum(stored_ex) / len(stored_ex), 4),
               "rules": per_rule}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
