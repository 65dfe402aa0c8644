"""Multi-turn figures (SParC/CoSQL): question match and interaction match, as the official evaluator prints them."""

from __future__ import annotations


def match_figures(scores: dict, etype: str) -> tuple[dict, dict]:
    """Question match (every question: the `all` column) and interaction match (interactions with every turn
    right: the `joint_all` column), for EX and EM, as the official SParC/CoSQL evaluator prints them."""
    def pick(level: str) -> dict:
        s = scores[level]
        return {"ex": s["exec"] if etype != "match" else None, "em": s["exact"] if etype != "exec" else None,
                "count": s["count"]}
    return pick("all"), pick("joint_all")


def format_matches(question: dict, interaction: dict) -> str:
    def cells(m: dict) -> str:
        return "   ".join(f"{name} {m[key]:.3f}" for name, key in (("EX", "ex"), ("EM", "em")) if m[key] is not None)
    return "\n".join([f"{'question match':20} {cells(question)}   ({question['count']} questions, turn level)",
                      f"{'interaction match':20} {cells(interaction)}   ({interaction['count']} interactions, "
                      "every turn right)"])
