"""What a run carries from step to step and from one process to its ``--resume``: ``RunState`` (saved in
every checkpoint under ``run_state``) and the run's length in steps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from minillm.config import TrainConfig


@dataclass
class RunState:
    """Everything a checkpoint restores besides weights, optimizer, scaler, loader position and RNG."""

    step: int = 0  # optimizer steps done
    best_val: float = math.inf  # best validation loss so far
    bad_evals: int = 0  # evaluations since the best one (the patience counter)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    train_history: list[dict[str, Any]] = field(default_factory=list)  # smoothed training loss, log steps + evaluations
    tokens: int = 0  # training tokens seen
    elapsed_s: float = 0.0  # wall-clock seconds of the run so far, across resumes
    running: list[float] = field(default_factory=list)  # training losses since the last evaluation
    schedule: dict[str, Any] | None = None  # the optim.Schedule, as a dict
    eval_every: int = 0  # evaluation interval fixed by a --max-time plan (0: from --eval-every or total / 10)
    planned: bool = True  # False until a --max-time run has measured its step time and fixed its total
    plan_step_s: float = 0.0  # seconds per step, evaluations included, that the --max-time plan assumed
    train_s: float = 0.0  # seconds spent in training steps, leaving out each process's first (compilation)
    first_step_s: float = 0.0  # seconds of the first step (includes torch.compile), summed over resumes


def total_steps_for(cfg: TrainConfig, windows_per_epoch: int) -> int:
    """Optimizer steps in the run: whichever of ``epochs`` and ``max_steps`` ends first (0 = neither set)."""
    per_step = cfg.batch_size * cfg.accumulation_steps
    by_epochs = math.ceil(cfg.epochs * windows_per_epoch / per_step) if cfg.epochs > 0 else 0
    cands = [s for s in (by_epochs, cfg.max_steps) if s > 0]
    return max(1, min(cands)) if cands else 0
