"""``--max-time``: fitting a run to a wall-clock budget. The loop times its steps and evaluations; once it has
measured a few steps after the first (compilation) it plans the run once: the total steps, so that the steps,
their evaluations and a final evaluation + checkpoint end within the budget, and a steady evaluation interval,
so that evaluations and checkpoints take at most ``EVAL_SHARE`` of it. After each evaluation the plan is
fitted again only when the measured time per step has moved by more than ``REPLAN_MARGIN`` from the one it
assumed; the learning-rate decay is stretched or shortened to end with it. Also: the ETA of the progress
lines, and the expected seconds per step of a model on a device (a warning when a preset is far too big)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from minillm.config import TrainConfig
from minillm.optim.groups import UNBOUNDED, Schedule, rescheduled
from minillm.train.log import fmt_duration, peak_flops
from minillm.train.state import RunState

EVAL_SHARE = 0.10  # evaluations and checkpoints together: at most this share of the budget
MAX_EVALS = 10  # evaluations in a planned run, the final one included (fewer when each one is costly)
REPLAN_MARGIN = 0.15  # replan when the measured seconds per step move by more than this share from the plan's
LOG_MARGIN = 0.05  # log a replan when the total moves by more than this share
SAVE_S = 0.5  # seconds allowed for a checkpoint in the first plan's evaluation cost (corrected by measurement)
CPU_FLOPS_PER_THREAD = 10e9  # sustained fp32 FLOP/s of one CPU thread in training (measured: 10-20e9)
GPU_MFU = 0.35  # the share of a GPU's peak a small model's training reaches
SLOW_STEP_S = 10.0  # a step expected to take longer than this is worth a warning
MIN_STEPS = 100  # ... and so is a --max-time budget expected to fit fewer steps than this


def plan_time_budget(step: int, elapsed: float, max_time: float, step_s: float, eval_s: float,
                     eval_every: int, limit: int, done_evals: int = 1) -> tuple[int, int]:
    """``(total_steps, eval_every)`` for a run that has done ``step`` steps in ``elapsed`` seconds so that the
    rest, its evaluations and a final evaluation + checkpoint fit in ``max_time`` (a 3% + 1.5 s margin).
    ``eval_every`` 0 picks an interval giving at most ``MAX_EVALS`` evaluations in the run (the one that
    planned and the final one included) that together take at most ``EVAL_SHARE`` of the budget; ``limit``
    caps the total (from --max-steps / --epochs); ``done_evals``: evaluations already made, the planning one included."""
    left = max_time - elapsed - eval_s - (0.03 * max_time + 1.5)  # margin: jitter and the process's exit
    if not eval_every:
        n_evals = min(MAX_EVALS, int(EVAL_SHARE * max_time / eval_s) if eval_s > 0 else MAX_EVALS) - 1 - done_evals
        steps = (left - max(0, n_evals) * eval_s) / step_s
        eval_every = max(1, int(steps / (n_evals + 1))) if n_evals > 0 else UNBOUNDED
    steps = left / (step_s + eval_s / eval_every)
    return max(step, min(limit, step + int(max(0.0, steps)))), eval_every


def step_time(durs: list[float]) -> float:
    """Mean seconds per step over the last 100 steps, leaving out the first (compilation) while it is among them."""
    recent = durs[-100:] if len(durs) > 100 else (durs[1:] or durs)
    return sum(recent) / len(recent) if recent else 0.0


def eta(durs: list[float], steps_left: int | None, eval_every: int, eval_s: float,
        time_left: float | None) -> float | None:
    """Seconds until the run ends, from the steps timed after the first (compilation, never counted): None
    until one is; ``steps_left`` None (not planned yet) falls back on ``time_left``, the --max-time budget's
    rest, which also bounds the estimate."""
    if len(durs) < 2:
        return None
    if steps_left is None:
        return time_left
    est = steps_left * step_time(durs) + (steps_left // max(1, eval_every) + 1) * eval_s
    return est if time_left is None else max(0.0, min(est, time_left))


def out_of_time(max_time: float, elapsed: float, next_s: float, eval_s: float) -> bool:
    """Whether another step and the final evaluation would end past ``max_time`` (0: no budget; a 1% margin)."""
    return bool(max_time) and elapsed + next_s + eval_s + 0.01 * max_time > max_time


def ready_to_plan(state: RunState, durs: list[float], max_time: float) -> bool:
    """Whether an unplanned --max-time run has timed enough steps (the first, compilation, apart) to plan."""
    return not state.planned and len(durs) >= 6 and (
        sum(durs[1:]) >= 1.0 or len(durs) >= 50 or sum(durs) >= 0.05 * max_time)


def first_eval_s(measured: float, step_s: float, tcfg: TrainConfig) -> float:
    """The steady cost of an evaluation, from a process's first one, which also compiled the evaluation path
    (2.2 s against ~0.3 s later for ``small`` on an H100): at most the forward passes of ``eval_batches``
    micro-batches, bounded by as many training micro-steps (forward and backward), plus ``SAVE_S`` for the
    checkpoint. ``replan(redo_interval=N)`` (N evaluations made) fits the interval again once the next one
    is measured, if it differs from that estimate by more than ``REPLAN_MARGIN``."""
    return min(measured, tcfg.eval_batches * step_s / max(1, tcfg.accumulation_steps) + SAVE_S)


def replan(state: RunState, sched: Schedule, tcfg: TrainConfig, elapsed: float, step_s: float, eval_s: float,
           limit: int, note: Callable[[str], None], redo_interval: int = 0) -> Schedule:
    """Plan a --max-time run from measured step and evaluation times: the first time, its total and evaluation
    interval; later, the total alone (the interval kept), and only when the seconds per step, evaluations
    included, moved by more than ``REPLAN_MARGIN`` from the plan's. The decay is recomputed from the current
    step when the total moves by more than 1%; ``note`` hears of a first plan and of a total moved by more
    than ``LOG_MARGIN``."""
    first = not state.planned
    fixed = tcfg.eval_every or (0 if first or redo_interval else state.eval_every)
    cost = step_s + (eval_s / fixed if 0 < fixed < UNBOUNDED else 0.0)
    if (not first and not redo_interval and state.plan_step_s
            and abs(cost - state.plan_step_s) <= REPLAN_MARGIN * state.plan_step_s):
        return sched
    old_every = state.eval_every
    total, every = plan_time_budget(state.step, elapsed, tcfg.max_time, step_s, eval_s, fixed, limit,
                                    redo_interval or 1)
    state.planned, state.eval_every = True, (0 if tcfg.eval_every else every)
    state.plan_step_s = step_s + (eval_s / every if every < UNBOUNDED else 0.0)
    if not first and abs(total - sched.total) <= max(1, 0.01 * sched.total) and every == old_every:
        return sched
    new = rescheduled(sched, state.step, total)
    state.schedule = dataclasses.asdict(new)
    if first or abs(total - sched.total) > LOG_MARGIN * sched.total or every != old_every:
        note(f"--max-time {fmt_duration(tcfg.max_time)}: {step_s * 1000:.1f} ms/step, {eval_s:.1f} s per "
             f"evaluation -> {new.total} steps in all, "
             + (f"evaluating every {every}" if every < UNBOUNDED else "evaluating at the end"))
    return new


def expected_step_s(flops_per_step: float, device: torch.device) -> float | None:
    """Rough seconds per training step of ``flops_per_step`` on ``device`` (CPU threads or a known GPU's peak
    times ``GPU_MFU``); None where the device's speed is unknown."""
    if device.type == "cpu":
        return flops_per_step / (CPU_FLOPS_PER_THREAD * torch.get_num_threads())
    peak = peak_flops(device)
    return flops_per_step / (GPU_MFU * peak) if peak else None


def too_big_warning(step_s: float | None, device: torch.device, max_time: float) -> str | None:
    """A warning when a step is expected to take over ``SLOW_STEP_S`` or a --max-time budget to fit fewer than
    ``MIN_STEPS`` of them: the expected time per step and what to do; None otherwise."""
    if step_s is None or (step_s < SLOW_STEP_S and not (max_time and max_time / step_s < MIN_STEPS)):
        return None
    where = f"this CPU ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    per_step = f"{step_s:,.0f} s" if step_s >= 10 else f"{step_s:.2g} s"
    fits = f"; --max-time {fmt_duration(max_time)} fits about {math.floor(max_time / step_s)} of them" if max_time else ""
    if step_s < SLOW_STEP_S:  # only the budget is short
        return (f"warning: --max-time {fmt_duration(max_time)} fits only about {math.floor(max_time / step_s)} steps "
                f"of about {per_step} on {where}; give a larger --max-time, or a smaller model")
    return (f"warning: this model is far too big for {where}: about {per_step} a step{fits}. "
            f"Try --config tiny (or a smaller --batch-size / --n-layer), and --max-time to bound the run")
