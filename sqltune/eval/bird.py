"""BIRD's figures: execution accuracy per difficulty (simple, moderate, challenging) and in total, as the official
BIRD evaluator prints them."""

from __future__ import annotations


def bird_figures(results: list[dict]) -> dict:
    levels: dict[str, list[int]] = {}
    for r in results:
        for level in ({r["hardness"], "total"} if r["hardness"] != "all" else {"total"}):
            levels.setdefault(level, []).append(r["ex"] or 0)
    table = {k: {"count": len(v), "exec": sum(v) / len(v) if v else 0.0} for k, v in levels.items()}
    return {"bird": table, "ex": table.get("total", {}).get("exec")}


def format_bird(figures: dict) -> str:
    order = [k for k in ("simple", "moderate", "challenging") if k in figures["bird"]] + ["total"]
    if "total" not in figures["bird"]:
        return "no question scored"
    lines = ["{:20} ".format("") + " ".join(f"{k:<20}" for k in order),
             "{:20} ".format("count") + " ".join(f"{figures['bird'][k]['count']:<20d}" for k in order),
             "{:20} ".format("execution") + " ".join(f"{figures['bird'][k]['exec']:<20.3f}" for k in order)]
    return "\n".join(lines)
