"""Aggregating per-example results into the official tables (evaluation.evaluate / print_scores).

Per level (easy, medium, hard, extra, all): count, EX averaged over the count, EM over the questions it could
score (`em_count`; a gold the parser cannot read has hardness "unknown": it counts in `all` for EX only, so where
every gold parses the figures are the official ones); each partial component's
accuracy is averaged over the examples whose prediction has that component, recall over those whose gold has it,
and F1 comes from those two averages (1 when both are 0, as the official prints it). Multi-turn files add
joint_all (every turn of an interaction right) and per-turn tables.
"""

from __future__ import annotations

from sqltune.eval.exact_match import PARTIAL_TYPES

LEVELS = ("easy", "medium", "hard", "extra", "all")
TURNS = ("turn 1", "turn 2", "turn 3", "turn 4", "turn > 4")


def turn_name(index: int) -> str:
    return f"turn {index + 1}" if index < 4 else "turn > 4"


def aggregate(results: list[dict], multi_turn: bool, etype: str) -> dict:
    """`results`: one dict per example with hardness, turn, interaction, ex, em, partial."""
    levels = LEVELS + (("joint_all",) if multi_turn else ())
    scores: dict = {}
    for level in levels:
        scores[level] = {"count": 0, "em_count": 0, "exec": 0.0, "exact": 0.0,
                         "partial": {t: {"acc": 0.0, "rec": 0.0, "f1": 0.0, "acc_count": 0, "rec_count": 0}
                                     for t in PARTIAL_TYPES}}
    for turn in TURNS:
        scores[turn] = {"count": 0, "em_count": 0, "exec": 0.0, "exact": 0.0}
    interactions: dict[int, list[dict]] = {}
    for r in results:
        interactions.setdefault(r["interaction"], []).append(r)
        keys = [k for k in (r["hardness"], "all", turn_name(r["turn"])) if k in scores]
        for key in keys:
            scores[key]["count"] += 1
            scores[key]["exec"] += r.get("ex") or 0
            if r.get("em") is not None:
                scores[key]["em_count"] += 1
                scores[key]["exact"] += r["em"]
        if etype in ("all", "match") and r.get("partial"):
            for level in [k for k in (r["hardness"], "all") if k in LEVELS]:
                for t in PARTIAL_TYPES:
                    part, mine = scores[level]["partial"][t], r["partial"][t]
                    if mine["pred_total"] > 0:
                        part["acc"] += mine["acc"]
                        part["acc_count"] += 1
                    if mine["label_total"] > 0:
                        part["rec"] += mine["rec"]
                        part["rec_count"] += 1
    if multi_turn:
        for turns in interactions.values():
            scores["joint_all"]["count"] += 1
            scores["joint_all"]["em_count"] += 1
            scores["joint_all"]["exec"] += all(t.get("ex") == 1 for t in turns)
            scores["joint_all"]["exact"] += all(t.get("em") == 1 for t in turns)
    for key in levels + TURNS:
        s = scores[key]
        if s["count"]:
            s["exec"] /= s["count"]
        if s["em_count"]:
            s["exact"] /= s["em_count"]
        if "partial" not in s or not s["count"]:
            continue
        for part in s["partial"].values():
            part["acc"] = part["acc"] / part["acc_count"] if part["acc_count"] else 0
            part["rec"] = part["rec"] / part["rec_count"] if part["rec_count"] else 0
            acc, rec = part["acc"], part["rec"]
            part["f1"] = 1 if acc == 0 and rec == 0 else 2.0 * acc * rec / (acc + rec)
    return scores


def _row(name: str, values, fmt: str) -> str:
    return ("{:20} " + " ".join([fmt] * len(values))).format(name, *values)


def format_table(scores: dict, etype: str, multi_turn: bool) -> str:
    """The official printout's layout, so the two can be compared line by line."""
    levels = list(LEVELS) + (["joint_all"] if multi_turn else [])
    out = [_row("", levels, "{:20}"), _row("count", [scores[lv]["count"] for lv in levels], "{:<20d}")]
    if etype in ("all", "exec"):
        out.append("=====================   EXECUTION ACCURACY     =====================")
        out.append(_row("execution", [scores[lv]["exec"] for lv in levels], "{:<20.3f}"))
    if etype in ("all", "match"):
        out += ["", "====================== EXACT MATCHING ACCURACY ====================="]
        out.append(_row("exact match", [scores[lv]["exact"] for lv in levels], "{:<20.3f}"))
        for title, key in (("\n---------------------PARTIAL MATCHING ACCURACY----------------------", "acc"),
                           ("---------------------- PARTIAL MATCHING RECALL ----------------------", "rec"),
                           ("---------------------- PARTIAL MATCHING F1 --------------------------", "f1")):
            out.append(title)
            for t in PARTIAL_TYPES:
                out.append(_row(t, [scores[lv]["partial"][t][key] for lv in levels], "{:<20.3f}"))
    if multi_turn:
        out += ["", "", _row("", list(TURNS), "{:20}"), _row("count", [scores[t]["count"] for t in TURNS], "{:<20d}")]
        if etype in ("all", "exec"):
            out.append("=====================   TURN EXECUTION ACCURACY     =====================")
            out.append(_row("execution", [scores[t]["exec"] for t in TURNS], "{:<20.3f}"))
        if etype in ("all", "match"):
            out += ["", "====================== TURN EXACT MATCHING ACCURACY ====================="]
            out.append(_row("exact match", [scores[t]["exact"] for t in TURNS], "{:<20.3f}"))
    return "\n".join(out)
