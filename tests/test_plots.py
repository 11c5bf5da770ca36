"""Training curves (minillm/train/plots.py): what is drawn (the figure's lines), and the PNG it becomes."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import imread

from minillm.train.plots import plot_curves

HIST = [{"step": 1, "tokens": 100, "train_loss": None, "val_loss": 5.1, "val_ppl": 164.0},  # no training loss yet
        {"step": 2, "tokens": 200, "train_loss": 4.8, "val_loss": 4.9, "val_ppl": 134.3},
        {"step": 3, "tokens": 300, "train_loss": 4.2, "val_loss": 4.4, "val_ppl": 81.45}]


def _drawn(monkeypatch, tmp_path) -> tuple[Figure, np.ndarray]:
    """plot_curves(HIST): the figure it saved and the PNG's pixels (H, W, RGB)."""
    saved: list[Figure] = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self) or savefig(self, *a, **k))
    out = tmp_path / "curves.png"
    plot_curves(HIST, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # written atomically: no temporary file left
    assert len(saved) == 1
    return saved[0], imread(out)[..., :3]


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_curves_draw_the_history_against_tokens(tmp_path, monkeypatch):
    fig, _ = _drawn(monkeypatch, tmp_path)
    loss, ppl = fig.axes
    assert _lines(loss) == {"train": ([200, 300], [4.8, 4.2]),  # the record without a training loss is left out
                            "validation": ([100, 200, 300], [5.1, 4.9, 4.4])}
    assert list(_lines(ppl).values()) == [([100, 200, 300], [164.0, 134.3, 81.45])]
    assert ppl.get_yscale() == "log" and loss.get_xlabel() == ppl.get_xlabel() == "tokens"
    assert sorted(t.get_text() for t in loss.get_legend().get_texts()) == ["train", "validation"]
    assert fig.get_suptitle() == "step 3: validation loss 4.4000, perplexity 81.45"


def test_curves_png_shows_both_panels(tmp_path, monkeypatch):
    """10 x 4 inches at 100 dpi; each curve's colour is on the panel that draws it (the perplexity panel has
    only the orange curve), and most of the image is the white background."""
    _, px = _drawn(monkeypatch, tmp_path)
    assert px.shape == (400, 1000, 3)

    def share(region: np.ndarray, colour: str) -> float:
        return float((np.abs(region - np.array(to_rgb(colour))).max(axis=-1) < 0.05).mean())

    left, right = px[:, :500], px[:, 500:]
    assert share(left, "tab:blue") > 0.001 and share(left, "tab:orange") > 0.001
    assert share(right, "tab:orange") > 0.001 and share(right, "tab:blue") == 0
    assert share(px, "white") > 0.5
