"""Training curves (minillm/train/plots.py) and the length histogram (corpus/stats.py ``plot_lengths``): what
is drawn (the figure's lines, tick labels, marks), the PNG it becomes, and the ``train`` records a run logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import imread

from minillm.corpus.stats import fmt_count, plot_lengths
from minillm.train.plots import plot_curves, train_curve
from tests.conftest import events

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v_c624e6b"

HIST = [{"step": 1, "tokens": 100, "train_loss": None, "val_loss": 5.1, "val_ppl": 164.0},  # no training loss yet
        {"step": 2, "tokens": 200, "train_loss": 4.8, "val_loss": 4.9, "val_ppl": 134.3},
        {"step": 3, "tokens": 300, "train_loss": 4.2, "val_loss": 4.4, "val_ppl": 81.45}]


def _drawn(monkeypatch, tmp_path, history=HIST, train=(), draw=plot_curves) -> tuple[Figure, np.ndarray]:
    """draw(history, PNG, train): the figure it saved and the PNG's pixels (H, W, RGB)."""
    saved: list[Figure] = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self) or savefig(self, *a, **k))
    out = tmp_path / "curves.png"
    draw(history, out, train)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # written atomically: no temporary file left
    assert len(saved) == 1
    return saved[0], imread(out)[..., :3]


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_curves_draw_the_history_against_tokens(tmp_path, monkeypatch):
    fig, _ = _drawn(monkeypatch, tmp_path)
    loss, ppl = fig.axes
    best = "best checkpoint (step 3)"
    assert _lines(loss) == {"train": ([200, 300], [4.8, 4.2]),  # the record without a training loss is left out
                            "validation": ([100, 200, 300], [5.1, 4.9, 4.4]), best: ([300], [4.4])}
    assert _lines(ppl) == {"_child0": ([100, 200, 300], [164.0, 134.3, 81.45]), best: ([300], [81.45])}
    assert ppl.get_yscale() == "log" and loss.get_xlabel() == ppl.get_xlabel() == "tokens"
    assert sorted(t.get_text() for t in loss.get_legend().get_texts()) == [best, "train", "validation"]
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


# ---------------------------------------------------------------- issue 24: curves that read


def test_count_labels_are_short_at_any_scale():
    assert [fmt_count(x) for x in (0, 5, 500, 1000, 1500, 250_000, 360_448, 1_200_000, 2e6, 3e9)] == \
        ["0", "5", "500", "1k", "1.5k", "250k", "360k", "1.2M", "2M", "3B"]


@pytest.mark.parametrize("top", [300, 36_000, 360_448, 4.2e6, 7.5e9])
def test_token_ticks_are_k_m_labels_that_do_not_overlap(tmp_path, monkeypatch, top):
    """At ~360k tokens the labels ran together ("1000001500002000002500000"): each is now a few characters
    (k/M/B) and no two touch, at any scale."""
    hist = [{"step": i, "tokens": int(top * i / 20), "train_loss": 5 - i / 10, "val_loss": 5 - i / 9,
             "val_ppl": np.exp(5 - i / 9)} for i in range(1, 21)]
    fig, _ = _drawn(monkeypatch, tmp_path, hist)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()
                 and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
        assert len(ticks) >= 3
        assert all(len(t.get_text()) <= 5 for t in ticks), [t.get_text() for t in ticks]
        boxes = sorted((t.get_window_extent(renderer) for t in ticks), key=lambda b: b.x0)
        assert all(a.x1 < b.x0 for a, b in pairwise(boxes)), [t.get_text() for t in ticks]


TRAIN = [{"step": s, "tokens": 100 * s, "loss": 5.5 - s / 10} for s in (1, 2, 3)]


def test_the_training_curve_is_the_logged_losses_and_the_best_checkpoint_is_marked(tmp_path, monkeypatch):
    """The training loss of every log step (not two points at the evaluations); the best evaluation, not
    the last, is starred and named in the title."""
    hist = HIST + [{"step": 4, "tokens": 400, "train_loss": 4.0, "val_loss": 4.6, "val_ppl": 99.5}]
    fig, px = _drawn(monkeypatch, tmp_path, hist, TRAIN + [{"step": 4, "tokens": 400, "loss": 4.1}])
    loss, _ = fig.axes
    lines = _lines(loss)
    assert lines["train"] == ([100, 200, 300, 400], [5.4, 5.3, 5.2, 4.1])
    assert lines["best checkpoint (step 3)"] == ([300], [4.4])
    assert fig.get_suptitle() == "step 4: validation loss 4.6000, perplexity 99.50; best 4.4000 at step 3"
    assert (np.abs(px - np.array(to_rgb("tab:green"))).max(axis=-1) < 0.05).sum() > 50  # the stars are drawn


def test_an_older_history_goes_on_with_logged_losses_after_a_resume():
    """A run written before ``train`` existed, resumed now: its evaluations' losses first, then the records."""
    later = [{"step": 3, "tokens": 300, "loss": 4.0}, {"step": 4, "tokens": 400, "loss": 3.9}]
    assert train_curve(HIST, later) == [(200, 4.8), (300, 4.0), (400, 3.9)]
    assert train_curve(HIST, []) == [(200, 4.8), (300, 4.2)]
    assert train_curve([], []) == []


def test_the_old_fixture_history_plots(tmp_path, monkeypatch):
    old = json.loads((FIXTURE / "run" / "history.json").read_text())
    assert "train" not in old
    fig, _ = _drawn(monkeypatch, tmp_path, old["evals"])
    assert _lines(fig.axes[0])["train"] == ([384, 768], [h["train_loss"] for h in old["evals"]])


def _train(tokenizer: Path, corpus: Path, out: Path, resume: bool = False, **kw):
    from minillm.config import resolve
    from minillm.data.loader import Mixture
    from minillm.train import run as tr

    tiny = dict(block_size=16, n_layer=1, n_head=2, n_embd=32, batch_size=4, device="cpu", eval_batches=2,
                warmup_steps=2, compile="off", log_every=3, eval_every=5, max_steps=12)
    mcfg, tcfg = resolve("tiny", {**tiny, **kw})
    spec = tr.RunSpec(tokenizer=tokenizer, corpus=Mixture((corpus,)), outdir=out, resume=resume,
                      log_format="json")
    return tr.train(spec, mcfg, tcfg)


def test_a_run_logs_its_smoothed_training_loss_and_a_resumed_run_continues_it(tmp_path, tokenizer_path, corpus,
                                                                                capsys, monkeypatch):
    """``train`` in history.json: at every log step and evaluation, the loss averaged over the last log_every steps
    (not reaching back past an evaluation); interrupted at step 7 and resumed, the run records exactly what a
    straight run does."""
    from minillm.train import loop

    _train(tokenizer_path, corpus, tmp_path / "every", log_every=1)  # the same run, each step's loss printed
    losses = {e["step"]: e["loss"] for e in events(capsys.readouterr().err)}
    _train(tokenizer_path, corpus, tmp_path / "a")
    hist = json.loads((tmp_path / "a" / "history.json").read_text())
    assert hist["format"] == 1 and [h["step"] for h in hist["evals"]] == [5, 10, 12]
    rec = {t["step"]: t for t in hist["train"]}
    assert list(rec) == [1, 3, 5, 6, 9, 10, 12] and rec[12]["tokens"] == 12 * 4 * 16  # log steps and evaluations
    window = {1: [1], 3: [1, 2, 3], 5: [3, 4, 5], 6: [6], 9: [7, 8, 9], 10: [8, 9, 10], 12: [11, 12]}
    assert all(rec[s]["loss"] == pytest.approx(np.mean([losses[i] for i in w])) for s, w in window.items())

    real, fired = loop.lr_at, []

    def sigint_at_7(step, s):
        if step == 6 and not fired:
            fired.append(os.kill(os.getpid(), signal.SIGINT))
        return real(step, s)

    monkeypatch.setattr(loop, "lr_at", sigint_at_7)
    with pytest.raises(loop.Interrupted):
        _train(tokenizer_path, corpus, tmp_path / "b")
    monkeypatch.setattr(loop, "lr_at", real)
    _train(tokenizer_path, corpus, tmp_path / "b", resume=True)
    resumed = json.loads((tmp_path / "b" / "history.json").read_text())
    assert resumed["train"] == hist["train"] and len(resumed["evals"]) == 3


def test_the_old_fixture_run_resumes_and_its_curves_continue(tmp_path, runner, monkeypatch):
    """tests/fixtures/v_c624e6b (no ``train`` key) resumes for 3 more steps: its evaluations are kept, the
    new log steps are recorded, and curves.png draws both."""
    from minillm.cli import app

    shutil.copytree(FIXTURE, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    r = runner.invoke(app, ["train", "-t", "run/tokenizer.json", "-c", "corpus.txt", "-o", "run", "--config",
                            "fx.toml", "--resume", "--max-steps", "9"])
    assert r.exit_code == 0, r.output
    hist = json.loads(Path("run/history.json").read_text())
    assert [h["step"] for h in hist["evals"]] == [3, 6, 9] and [t["step"] for t in hist["train"]] == [9]  # log_every 3
    assert train_curve(hist["evals"], hist["train"])[:2] == [(384, hist["evals"][0]["train_loss"]),
                                                            (768, hist["evals"][1]["train_loss"])]
    assert Path("run/curves.png").stat().st_mtime > (FIXTURE / "run" / "history.json").stat().st_mtime


# ---------------------------------------------------------------- lengths.png


def test_length_histogram_starts_at_the_shortest_documents_decade_and_marks_the_block_size(tmp_path, monkeypatch):
    lengths = [51, 60, 80, 120, 200, 300, 700, 1500, 4000]
    fig, _ = _drawn(monkeypatch, tmp_path, lengths, False, draw=plot_lengths_with_block)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_xlim()[0] == 10  # not 10^0: the shortest is 51 tokens
    marks = {ln.get_label(): ln.get_xdata()[0] for ln in ax.get_lines()}
    assert marks == {"median 200": 200, "suggested block size 256": 256}
    labels = [t.get_text() for t in ax.get_xticklabels() if 10 <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert labels == ["10", "20", "50", "100", "200", "500", "1k", "2k"]
    assert sum(p.get_height() for p in ax.patches) == len(lengths)  # every document is in a bin


def plot_lengths_with_block(lengths, path, estimated):
    plot_lengths(lengths, path, estimated, 256)
