"""What a training run tells the user: progress lines on stderr (text or JSON), a rich progress bar on a
terminal, TensorBoard event files, the MFU estimate, and the run's history (``history.json`` and
``curves.png``, rewritten after each evaluation).

Only the main process (rank 0 under ``torchrun``) writes anything, so a multi-GPU run logs once.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from minillm.data.loader import Loader
from minillm.errors import MiniLLMError
from minillm.io import atomic_write_json
from minillm.train import plots
from minillm.train.state import RunState

# Dense bf16/fp16 tensor-core peak FLOP/s by device-name fragment (most specific first), for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "L40": 181e12, "A6000": 155e12, "A10G": 70e12, "A10": 125e12, "4090": 165e12,
              "3090": 71e12, "L4": 121e12, "T4": 65e12, "V100": 125e12}


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed run (``RANK`` set by torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def peak_flops(device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s looked up by its name; None on CPU or an unknown GPU."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def fmt_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def check_tensorboard() -> None:
    """Fail early, before any work, when ``--tensorboard`` is given but the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise MiniLLMError("--tensorboard: the tensorboard package is not installed; run `pip install tensorboard` "
                           "or leave out --tensorboard") from e


class TrainLog:
    """Progress lines (``fmt`` text or json) on stderr, a rich bar when stderr is a terminal, and
    TensorBoard scalars under ``tb_dir`` when given."""

    def __init__(self, fmt: str = "text", bar: bool | None = None):
        self.fmt, self.main = fmt, is_main_process()
        self._bar = self._task = self._tb = None
        if bar is None:
            bar = fmt == "text" and sys.stderr.isatty()
        if self.main and bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), console=Console(stderr=True), transient=True)

    def open_tensorboard(self, tb_dir: Path) -> None:
        """Also write scalars as TensorBoard event files under ``tb_dir``."""
        if self.main:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tb_dir))

    def __enter__(self) -> TrainLog:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task("", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def event(self, msg: str, **fields: Any) -> None:
        """One line: ``msg  key value ...`` as text, or ``{"event": msg, ...}`` as JSON."""
        if not self.main:
            return
        if self.fmt == "json":
            self._print(json.dumps({"event": msg, **fields}))
        else:
            text = {k: " ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v for k, v in fields.items()}
            self._print(f"{msg}  {'  '.join(f'{k} {v}' for k, v in text.items())}".rstrip())

    def progress(self, step: int, total: int) -> None:
        """Advance the terminal bar (no-op without one)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=step, total=total or None)

    def step(self, step: int, total: int, epoch: float, loss: float, lr: float, tokens_per_s: float,
             mfu: float | None, eta_s: float | None) -> None:
        """The progress line of one log interval."""
        if not self.main:
            return
        if self.fmt == "json":
            self._print(json.dumps({"event": "step", "step": step, "total": total, "epoch": round(epoch, 4),
                                    "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1),
                                    "mfu": None if mfu is None else round(mfu, 4), "eta_s": eta_s}))
        else:
            parts = [f"step {step}/{total or '?'}", f"epoch {epoch:.2f}", f"loss {loss:.4f}", f"lr {lr:.2e}",
                     f"tok/s {tokens_per_s:,.0f}"]
            if mfu is not None:
                parts.append(f"mfu {100 * mfu:.1f}%")
            if eta_s is not None:
                parts.append(f"eta {fmt_duration(eta_s)}")
            self._print("  ".join(parts))
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=f"loss {loss:.4f}")
        self.scalars(step, {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s}
                     | ({"train/mfu": mfu} if mfu is not None else {}))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)


# ---------------------------------------------------------------- the history: evaluations and training losses


def epoch_of(loader: Loader, loader_state: dict) -> float:
    """Epochs consumed at ``loader_state`` (from the consumed position, not the prefetcher's read-ahead)."""
    per_epoch = int(np.sum(loader.n_windows))
    return loader_state["epoch"] + loader_state["pos"] / max(1, per_epoch)


def eval_record(state: RunState, val: float, lr: float, loader: Loader, loader_state: dict) -> dict[str, Any]:
    """One evaluation's entry of ``history.json`` (docs/FORMATS.md), at ``state`` after ``state.elapsed_s``;
    a mixture adds each corpus's epochs."""
    rec = {"step": state.step, "epoch": round(epoch_of(loader, loader_state), 4),
           "tokens": state.tokens, "train_loss": float(np.mean(state.running)) if state.running else None,
           "val_loss": val, "val_ppl": math.exp(min(val, 50)), "lr": lr,
           "tokens_per_s": state.tokens / max(state.elapsed_s, 1e-9), "elapsed_s": round(state.elapsed_s, 3),
           "train_s": round(state.train_s, 3), "first_step_s": round(state.first_step_s, 3)}
    if len(loader.sources) > 1:  # a mixture: each corpus's own epochs
        rec["source_epochs"] = {src.name: round(d / n, 4) for src, d, n in
                                zip(loader.sources, loader_state["drawn"], loader.n_windows, strict=True)}
    return rec


def record_train_loss(state: RunState, steps: int) -> None:
    """Add this step's entry to ``state.train_history`` (``history.json``'s ``train``; once per step, at log steps
    and evaluations): the training loss smoothed as the mean of the last ``steps`` steps' losses (fewer right
    after an evaluation), so a resumed run records what a straight one would."""
    if state.running and not (state.train_history and state.train_history[-1]["step"] == state.step):
        loss = float(np.mean(state.running[-max(1, steps):]))
        state.train_history.append({"step": state.step, "tokens": state.tokens, "loss": loss})


def write_history(outdir: Path, history: list[dict[str, Any]], train: list[dict[str, Any]] | None = None) -> None:
    """``OUTDIR/history.json`` (``train`` only when given) and ``OUTDIR/curves.png``, each written atomically."""
    atomic_write_json(outdir / "history.json", {"format": 1, "evals": history} | ({"train": train} if train else {}))
    plots.plot_curves(history, outdir / "curves.png", train or ())
