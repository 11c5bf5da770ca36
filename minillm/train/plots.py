"""The training curves of a run (``curves.png``): loss and perplexity against tokens seen. (The histogram
of document lengths that ``analyze-corpus --plot`` draws is ``minillm.corpus.stats.plot_lengths``.)"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKERS_UP_TO = 40  # a curve of more points is drawn as a plain line


def train_curve(history: Sequence[dict[str, Any]], train: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(tokens, training loss) points: each logged ``train`` record, preceded by the evaluations' ``train_loss``
    from before the first of them (a history written before ``train`` was logged has only those)."""
    first = train[0]["step"] if train else float("inf")
    old = [(h["tokens"], h["train_loss"]) for h in history if h.get("train_loss") is not None and h["step"] < first]
    return old + [(t["tokens"], t["loss"]) for t in train]


def best_eval(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation ``ckpt_best.pt`` holds: the first with the lowest validation loss (None for no history)."""
    return min(history, key=lambda h: h["val_loss"], default=None)


def plot_curves(history: list[dict[str, Any]], path: Path, train: Sequence[dict[str, Any]] = ()) -> None:
    """Training loss (``train`` records, see ``train_curve``), validation loss and perplexity against tokens
    seen, the best checkpoint marked, written atomically as a PNG. Uses matplotlib's object API with the Agg
    canvas (no pyplot state: safe in any thread) and fixed margins (``tight_layout`` would double the cost,
    and this runs after every evaluation)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator

    from minillm.corpus.stats import fmt_count
    from minillm.io import atomic_open

    tokens = [h["tokens"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    points = train_curve(history, train)
    if points:
        ax1.plot(*zip(*points, strict=True), label="train", color="tab:blue",
                 marker="." if len(points) <= MARKERS_UP_TO else None)
    val_marker = "o" if len(history) <= MARKERS_UP_TO else None
    ax1.plot(tokens, [h["val_loss"] for h in history], label="validation", color="tab:orange", marker=val_marker)
    ax2.plot(tokens, [h["val_ppl"] for h in history], color="tab:orange", marker=val_marker)
    best = best_eval(history)
    if best is not None:
        label = f"best checkpoint (step {best['step']})"
        ax1.plot([best["tokens"]], [best["val_loss"]], label=label, color="tab:green", marker="*", ms=14, ls="")
        ax2.plot([best["tokens"]], [best["val_ppl"]], label=label, color="tab:green", marker="*", ms=14, ls="")
        ax2.legend()
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    ax2.set_ylabel("validation perplexity")
    ax2.set_yscale("log")
    for axis_formatter in (ax2.yaxis.set_major_formatter, ax2.yaxis.set_minor_formatter):  # 800, not 8 x 10^2
        axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    for ax in (ax1, ax2):
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.xaxis.set_major_formatter(FuncFormatter(fmt_count))
        ax.grid(alpha=0.3)
    if history:
        last = history[-1]
        title = f"step {last['step']}: validation loss {last['val_loss']:.4f}, perplexity {last['val_ppl']:.2f}"
        if best is not last:
            title += f"; best {best['val_loss']:.4f} at step {best['step']}"
        fig.suptitle(title, fontsize=10)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
