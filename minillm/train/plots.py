"""The training curves of a run (``curves.png``): loss and perplexity against tokens seen. (The histogram
of document lengths that ``analyze-corpus --plot`` draws is ``minillm.corpus.stats.plot_lengths``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss (train and validation) and validation perplexity against tokens seen, written atomically as
    a PNG. Uses matplotlib's object API with the Agg canvas (no pyplot state: safe in any thread) and
    fixed margins (``tight_layout`` would double the cost, and this runs after every evaluation)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from minillm.io import atomic_open

    tokens = [h["tokens"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.93, wspace=0.25)
    train = [(t, h["train_loss"]) for t, h in zip(tokens, history, strict=True) if h.get("train_loss") is not None]
    if train:
        ax1.plot(*zip(*train, strict=True), label="train", marker=".")
    ax1.plot(tokens, [h["val_loss"] for h in history], label="validation", marker="o")
    ax1.set_xlabel("tokens")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(tokens, [h["val_ppl"] for h in history], color="tab:orange", marker="o")
    ax2.set_xlabel("tokens")
    ax2.set_ylabel("validation perplexity")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    if history:
        last = history[-1]
        fig.suptitle(f"step {last['step']}: validation loss {last['val_loss']:.4f}, perplexity {last['val_ppl']:.2f}",
                     fontsize=10)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
