"""Two evaluations of the same questions, question by question: how many answers changed, how many turned right and
how many turned wrong. On 100 or 300 questions a gain of a point or two is one or a few questions; this says which
way each one went, so a difference of EX is read against the churn under it.

    python benchmarks/compare_arms.py RUN/eval/eval_sft RUN/eval/eval_grpo

Each argument is an evaluation folder (`sqltune evaluate`'s output, as a recipe's eval/<step>/) holding
per_example.jsonl. Reads files only; times nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqltune.errors import SqltuneError
from sqltune.io import read_jsonl
from sqltune.report.page import EXAMPLES


def examples(folder: Path) -> list[dict]:
    return list(read_jsonl(folder / EXAMPLES))


def compare(before: list[dict], after: list[dict]) -> dict:
    """Counts over questions paired by position (both files must hold the same questions in the same order)."""
    if [x["question"] for x in before] != [x["question"] for x in after]:
        raise ValueError("the two evaluations are not of the same questions in the same order")
    pairs = list(zip(before, after))
    return {"questions": len(pairs), "changed": sum(a["pred"] != b["pred"] for a, b in pairs),
            "newly_right": sum(b["ex"] and not a["ex"] for a, b in pairs),
            "newly_wrong": sum(a["ex"] and not b["ex"] for a, b in pairs),
            "ex_before": sum(bool(a["ex"]) for a in before) / len(pairs),
            "ex_after": sum(bool(b["ex"]) for b in after) / len(pairs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="evaluation folder of the first arm")
    parser.add_argument("after", type=Path, help="evaluation folder of the second arm")
    args = parser.parse_args(argv)
    try:
        c = compare(examples(args.before), examples(args.after))
    except (SqltuneError, OSError, ValueError, KeyError) as exc:
        print(f"compare_arms: {exc}", file=sys.stderr)
        return 2
    print(f"{args.before.name} -> {args.after.name}: EX {c['ex_before']:.3f} -> {c['ex_after']:.3f} on "
          f"{c['questions']} questions; answers changed {c['changed']}, newly right {c['newly_right']}, "
          f"newly wrong {c['newly_wrong']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
