"""The report's plots, drawn with matplotlib (Agg, through `Figure` objects: pyplot's global state and backend are
left alone) and returned as PNG bytes, for files (evaluate --report, benchmarks) or to embed in the run's page.

Each function takes plain figures (no files, no stage code) and returns a PNG, or None when there is nothing to
draw; a caller that must not fail over a plot catches what it raises and says what is missing.
"""

from __future__ import annotations

import base64
import io
import math

PNG_DPI = 110
MEASURES = {"ex": "execution accuracy (EX)", "em": "exact match (EM)"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="tight")


def png_bytes(fig, dpi: int = PNG_DPI) -> bytes:
    """The figure as PNG (no date in it: the same figures give the same bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG as a `data:` address, so a page carries its images inside it."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def accuracy_by_level(arms: list[dict], levels: list[str], counts: dict, title: str,
                      measures: tuple[str, ...] = ("ex", "em")) -> bytes | None:
    """Grouped bars, one group per level (its question count under it), one bar per arm, one panel per measure
    that any arm has: `arms` is [{"name": str, "ex": {level: value or None}, "em": {...}}]."""
    shown = [m for m in measures if any(a.get(m, {}).get(lv) is not None for a in arms for lv in levels)]
    if not arms or not levels or not shown:
        return None
    fig = _figure(8, 3.6 * len(shown) + 0.4)
    width = 0.8 / len(arms)
    for row, measure in enumerate(shown):
        ax = fig.add_subplot(len(shown), 1, row + 1)
        for k, arm in enumerate(arms):
            xs = [i + (k - (len(arms) - 1) / 2) * width for i in range(len(levels))]
            values = [arm.get(measure, {}).get(lv) for lv in levels]
            bars = ax.bar(xs, [v or 0.0 for v in values], width, label=arm["name"])
            ax.bar_label(bars, labels=["-" if v is None else f"{v:.2f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(levels)), [f"{lv}\n({counts.get(lv, '?')})" for lv in levels])
        ax.set_ylim(0, 1.08)
        ax.set_ylabel(MEASURES.get(measure, measure))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on them
        if row == 0:
            ax.set_title(title, fontsize=10)
    return png_bytes(fig)


def training_loss(rows: list[dict]) -> bytes | None:
    """The training loss per logged step (and the evaluation loss, when the log has one); None without a loss."""
    loss = [(r["step"], r["loss"]) for r in rows if _number(r.get("loss")) and _number(r.get("step"))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if _number(r.get("eval_loss")) and _number(r.get("step"))]
    if not loss and not evals:
        return None
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    if loss:
        ax.plot(*zip(*loss), marker="o", markersize=2, label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", markersize=3, label="evaluation loss")
    return _per_step(fig, ax, "loss")


def _per_step(fig, ax, quantity: str) -> bytes:
    """A curve over training steps finished alike for every quantity (axes, title, grid, legend), as PNG bytes."""
    ax.set_xlabel("step")
    ax.set_ylabel(quantity)
    ax.set_title(quantity, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def reward_curve(rows: list[dict]) -> bytes | None:
    """The mean reward per logged step with its spread (TRL's GRPO logs `reward` and `reward_std`) as a band;
    None when the log holds no reward."""
    points = [(r["step"], r["reward"], r.get("reward_std")) for r in rows
              if _number(r.get("reward")) and _number(r.get("step"))]
    if not points:
        return None
    steps, means, spreads = zip(*points)
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    ax.plot(steps, means, marker="o", markersize=2, color="tab:green", label="mean reward")
    if all(_number(s) for s in spreads):
        ax.fill_between(steps, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                        color="tab:green", alpha=0.2, label="± reward std")
    return _per_step(fig, ax, "reward")


def failure_kinds(arms: list[tuple[str, dict]], top: int = 12) -> bytes | None:
    """Horizontal grouped bars: how many wrong answers of each kind, per arm (`arms`: [(name, {kind: count})]); the
    `top` most common kinds over all arms. None when no arm has a failure."""
    totals: dict[str, int] = {}
    for _, counts in arms:
        for kind, n in counts.items():
            totals[kind] = totals.get(kind, 0) + n
    kinds = sorted(totals, key=lambda k: (-totals[k], k))[:top]
    if not kinds:
        return None
    fig = _figure(8, 1.2 + 0.32 * len(kinds) * max(1, len(arms)) ** 0.5)
    ax = fig.add_subplot()
    height = 0.8 / len(arms)
    for k, (name, counts) in enumerate(arms):
        ys = [i + (k - (len(arms) - 1) / 2) * height for i in range(len(kinds))]
        bars = ax.barh(ys, [counts.get(kind, 0) for kind in kinds], height, label=name)
        ax.bar_label(bars, fontsize=7, padding=2)
    ax.set_yticks(range(len(kinds)), [kind if len(kind) <= 48 else kind[:47] + "…" for kind in kinds], fontsize=8)
    ax.invert_yaxis()  # the most common first
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # answers are counted whole
    ax.set_xlabel("wrong answers")
    ax.set_title("failure kinds (each wrong answer once, under its first failure)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return png_bytes(fig)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
