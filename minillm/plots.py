"""Plots people would rather look at than read: training curves, document-length histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and perplexity against tokens seen, written atomically as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minillm.checkpoint import atomic_open

    tokens = [h["tokens"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
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
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
