"""Optimizer groups, the learning-rate schedule and gradient clipping.

``lr_at(step, schedule)`` is a pure function of the step and a frozen ``Schedule``: linear warmup, then
cosine decay to ``min_lr``. When a resumed run changes its length, ``rescheduled`` keeps the past as it
was and recomputes the decay from the current step (and its learning rate) over the new total.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from minillm.config import TrainConfig
from minillm.optim.levers import lever

UNBOUNDED = 10**12  # the provisional total of a time-budgeted run before its steps are planned


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of a run (stored in its checkpoints)."""

    lr: float  # peak learning rate, reached at the end of warmup
    min_lr: float  # learning rate at ``total`` and after
    warmup: int  # linear warmup steps: lr * (step + 1) / warmup
    total: int  # the step at which the cosine decay reaches min_lr
    anchor_step: int = 0  # > 0: the decay was recomputed at this step (a resume changed ``total``) ...
    anchor_lr: float = 0.0  # ... starting from this learning rate


def schedule_for(cfg: TrainConfig, total: int) -> Schedule:
    """The schedule of a fresh run of ``total`` steps: warmup capped at a tenth of the run, min_lr
    defaulting to lr / 10 (``cfg.min_lr`` < 0)."""
    min_lr = cfg.lr / 10 if cfg.min_lr < 0 else cfg.min_lr
    warmup = min(cfg.warmup_steps, total // 10) if total < UNBOUNDED else cfg.warmup_steps
    return Schedule(lr=cfg.lr, min_lr=min_lr, warmup=warmup, total=max(1, total))


def lr_at(step: int, s: Schedule) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if step < s.warmup and not s.anchor_step:
        return s.lr * (step + 1) / s.warmup
    start, top = (s.anchor_step, s.anchor_lr) if s.anchor_step else (s.warmup, s.lr)
    progress = min(1.0, max(0.0, (step - start) / max(1, s.total - start)))
    return s.min_lr + 0.5 * (top - s.min_lr) * (1 + math.cos(math.pi * progress))


def rescheduled(s: Schedule, step: int, total: int) -> Schedule:
    """The schedule after the run's length changes to ``total`` at ``step``: steps before ``step`` keep
    their learning rates; the decay from ``step`` on is recomputed to reach min_lr at ``total``.
    During warmup, warmup continues (shortened to fit a tenth of the new total, never behind ``step``)."""
    total = max(total, step)  # a length already reached ends the run here: no extra step
    if total == s.total:
        return s
    if not s.anchor_step and step < s.warmup:
        return dataclasses.replace(s, total=total, warmup=max(step + 1, min(s.warmup, total // 10)))
    if not s.anchor_step and step == 0:
        return dataclasses.replace(s, total=total)
    return dataclasses.replace(s, total=total, anchor_step=step, anchor_lr=lr_at(step, s))


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW (fused on CUDA) with weight decay on 2-D weight matrices only: never on norms, biases or
    the embedding / output matrices. With ``optimizer == "muon"``, Muon takes the 2-D hidden matrices
    and AdamW the rest. Each param group records its ``base_lr``; ``set_lr`` scales it. The levers of
    ``minillm.optim.levers``: ``MINILLM_STEP_SYNC=log`` takes the fused AdamW on the CPU too (it skips a step on
    the device), ``MINILLM_MUON_NS=fused`` Muon's fused Newton-Schulz iteration."""
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "tok_emb" in name or "lm_head" in name
        if cfg.optimizer == "muon" and p.dim() == 2 and not is_embedding:
            hidden.append(p)
        elif p.dim() >= 2 and not is_embedding:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = cfg.lr
    fused = True if device.type == "cuda" or lever("STEP_SYNC", device.type) == "log" else None
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)]
    if hidden:
        from minillm.optim.muon import Muon

        muon = Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True,
                    fused_ns=lever("MUON_NS", device.type) == "fused")
        for g in muon.param_groups:
            g["base_lr"] = cfg.muon_lr
        opts.append(muon)
    return opts


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")  # how a group steps, not what it holds


def keep_implementation(opt: torch.optim.Optimizer) -> None:
    """After ``opt.load_state_dict``: each group steps the way this machine built ``opt`` (``opt.defaults``), not
    the way the checkpoint's machine did (torch restores the groups' ``fused``/``foreach`` flags with them: a run
    started on the CPU would resume on a GPU with plain AdamW, which refuses the device-side skip)."""
    for g in opt.param_groups:
        for key in IMPLEMENTATION_KEYS:
            if key in opt.defaults:
                g[key] = opt.defaults[key]


def set_lr(opts: list[torch.optim.Optimizer], scale: float) -> None:
    """Set every group's learning rate to ``base_lr * scale`` (scale = lr_at(step) / peak lr)."""
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The gradients' total L2 norm before clipping (a 0-d tensor, not synced); with ``max_norm`` > 0 the
    gradients are scaled so their norm is at most ``max_norm``. With FSDP the gradients are DTensor shards and
    so is their norm: it is made whole (an all-reduce over the ranks) so that every rank clips alike."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # a DTensor
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
