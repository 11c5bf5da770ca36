"""Training curves (minillm/train/plots.py)."""

from __future__ import annotations

from minillm.train.plots import plot_curves


def test_curves_png_is_written_atomically(tmp_path):
    hist = [{"step": t // 100, "tokens": t, "train_loss": 5.0 - t / 1000, "val_loss": 5.1 - t / 1000, "val_ppl": 150.0 - t / 10}
            for t in (100, 200, 300)]
    hist[0]["train_loss"] = None  # the first evaluation may have no training loss yet
    out = tmp_path / "curves.png"
    plot_curves(hist, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left
